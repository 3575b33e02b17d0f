"""Image processor for the ELA models: timm's evaluation transform, from the checkpoint's data config.

The data config (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``) is the ``pretrained_cfg``
block of ``config.json``, the same block timm reads, so preprocessing is identical through both front doors.
"""
from __future__ import annotations

import os
from typing import Any

import timm.data
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import ImageInput, make_flat_list_of_images
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME

__all__ = ["ElaImageProcessor"]


class ElaImageProcessor(BaseImageProcessor):
    """Resize, center-crop and normalise images as timm does for ``pretrained_cfg`` (evaluation transform).

    Args:
        pretrained_cfg (`dict`, *optional*):
            timm data config; defaults to the ``architecture``'s registered one.
        architecture (`str`, *optional*):
            An ela_hf timm model name, used when ``pretrained_cfg`` is not given.

    ``train_transforms`` holds timm's matching training transform (random resized crop, flip) for recipes.
    """

    main_input_name = "pixel_values"
    model_input_names = ["pixel_values"]

    def __init__(self, pretrained_cfg: dict[str, Any] | None = None, architecture: str | None = None, **kwargs):
        # kwargs are the other config.json keys when loaded from a model folder: not ours to keep
        super().__init__()
        if pretrained_cfg is None:
            if architecture is None:
                raise ValueError("ElaImageProcessor needs a pretrained_cfg (timm data config) or an architecture name")
            from .configuration_ela import default_pretrained_cfg

            pretrained_cfg = default_pretrained_cfg(architecture)
        self.pretrained_cfg = dict(pretrained_cfg)
        self.architecture = architecture
        self.data_config = timm.data.resolve_data_config(pretrained_cfg=self.pretrained_cfg, verbose=False)
        for key in ("mean", "std"):
            values = self.data_config[key]
            if len(values) != self.num_channels:
                raise ValueError(
                    f"the data config has input_size {list(self.data_config['input_size'])} ({self.num_channels} "
                    f"channels) but a {len(values)}-long {key} {list(values)}: give pretrained_cfg['{key}'] "
                    f"{self.num_channels} values"
                )
        self.val_transforms = timm.data.create_transform(**self.data_config, is_training=False)
        self.train_transforms = timm.data.create_transform(**self.data_config, is_training=True)

    @property
    def num_channels(self) -> int:
        return int(self.data_config["input_size"][0])

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("val_transforms", "train_transforms", "data_config"):
            output.pop(key, None)
        return output

    @classmethod
    def get_image_processor_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Read ``preprocessor_config.json`` when it was saved, else the ``pretrained_cfg`` in ``config.json``."""
        if "image_processor_filename" in kwargs:
            return super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)
        try:
            found, rest = super().get_image_processor_dict(
                pretrained_model_name_or_path, image_processor_filename=IMAGE_PROCESSOR_NAME, **dict(kwargs)
            )
            if "pretrained_cfg" in found:
                return found, rest
        except OSError:
            pass
        return super().get_image_processor_dict(
            pretrained_model_name_or_path, image_processor_filename=CONFIG_NAME, **kwargs
        )

    def preprocess(self, images: ImageInput, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """``images``: a PIL image, NumPy array or tensor, or a list of them -> ``{"pixel_values": [B, C, H, W]}``."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"ElaImageProcessor returns PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}")
        mode = {1: "L", 3: "RGB"}.get(self.num_channels)
        pixel_values = []
        for image in make_flat_list_of_images(images):
            if not isinstance(image, Image.Image):
                image = to_pil_image(image)
            if mode is not None and image.mode != mode:
                image = image.convert(mode)
            pixel_values.append(self.val_transforms(image))
        return BatchFeature({"pixel_values": torch.stack(pixel_values)}, tensor_type="pt")
