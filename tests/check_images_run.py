"""Run by tests/test_recipes_lib.py under ``accelerate launch --multi_gpu --num_processes 2``.

Every process checks its share of a dataset's images (rank 0 the even rows, rank 1 the odd ones). The two
unreadable images are both odd rows, so rank 0 reads none of them: it must still raise the same error as
rank 1, rather than go on to training and wait there for a rank that stopped. Each rank writes what it saw to
``<out>/rank<r>.json``.
"""
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from accelerate import PartialState
from datasets import Dataset, Image
from PIL import Image as PILImage

from ela_hf.training import check_images


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main(out: Path) -> None:
    PartialState()  # the process group of the launch (gloo on CPU)
    images = [{"bytes": png(i), "path": f"img{i}.png"} for i in range(8)]
    for bad in (3, 5):
        images[bad] = {"bytes": images[bad]["bytes"][:40], "path": f"img{bad}.png"}
    data = Dataset.from_dict({"image": images}).cast_column("image", Image(decode=False))
    result = {"world_size": dist.get_world_size(), "rank": dist.get_rank()}
    check_images(data.select([0, 1, 2, 4, 6, 7]), "image", "validation")  # readable: no error on any rank
    try:
        check_images(data, "image", "validation")
        result["error"] = None
    except ValueError as error:
        result["error"] = str(error)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()  # both ranks still in step after the error


if __name__ == "__main__":
    main(Path(sys.argv[1]))
