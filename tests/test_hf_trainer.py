"""The transformers Trainer with an ELA model: checkpoints keep the full structure and resume."""
import json

import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, TrainerCallback

from ela_hf import ElaConfig, ElaForImageClassification

MASK = [[False, True], [False, False], [False, False]]


class _TinyImages(Dataset):
    def __init__(self, n=8):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=generator)
        self.y = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class _SkipAfterFirstStep(TrainerCallback):
    """Stands in for the pruning callback: skips a layer in place during training."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            model.set_skip_mask(MASK)


def _args(out, **kwargs):
    return TrainingArguments(
        output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, max_steps=2, save_steps=1,
        learning_rate=0.01, report_to=[], logging_steps=1, dataloader_num_workers=0, save_only_model=False, **kwargs
    )


def test_trainer_checkpoints_keep_skipped_weights_and_resume(tmp_path):
    torch.manual_seed(0)
    model = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=3))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_TinyImages(), callbacks=[_SkipAfterFirstStep()])
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["skip_mask"] == MASK and "skip_mask" not in config["model_args"]
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "layer1.1.attn.wv.weight" in keys, "the skipped layer's weights stay for resume"
    assert not any(k.startswith("timm_model.") for k in keys)

    # resume into a fresh (unpruned) model: weights, skip flags and optimizer state all fit
    torch.manual_seed(1)
    fresh = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=3))
    resumed = Trainer(model=fresh, args=_args(tmp_path / "resumed", ignore_data_skip=True), train_dataset=_TinyImages())
    resumed.args.max_steps = 3
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert fresh.skip_mask == MASK
    assert resumed.state.global_step == 3
