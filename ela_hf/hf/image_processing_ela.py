"""Image processor for the ELA models: timm's evaluation transform, from the checkpoint's data config.

The data config (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``) is the ``pretrained_cfg``
block of ``config.json``, the same block timm reads, so preprocessing is identical through both front doors.
"""
from __future__ import annotations

import os
from typing import Any, TypedDict

import numpy as np
import timm.data
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    infer_channel_dimension_format,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME

from .configuration_ela import check_input_size

__all__ = ["ElaImageProcessor"]

# image-processing options of other processors (and timm data-config keys): this one takes them from
# pretrained_cfg only, so they are refused rather than silently ignored
_OTHER_OPTIONS = set(ImagesKwargs.__annotations__) | {
    "input_size", "crop_pct", "mean", "std", "interpolation", "crop_mode",
}
_OPTIONS_HINT = (
    "ElaImageProcessor applies the checkpoint's timm data config; for other settings give it another one: "
    "ElaImageProcessor(pretrained_cfg={**processor.pretrained_cfg, 'input_size': (3, 160, 160), 'crop_pct': 1.0})"
)


class ElaImageProcessorKwargs(TypedDict, total=False):
    pretrained_cfg: dict
    architecture: str


class ElaImageProcessor(BaseImageProcessor):
    """Resize, center-crop and normalise images as timm does for ``pretrained_cfg`` (evaluation transform).

    Args:
        pretrained_cfg (`dict`, *optional*):
            timm data config; defaults to the ``architecture``'s registered one.
        architecture (`str`, *optional*):
            An ela_hf timm model name, used when ``pretrained_cfg`` is not given; with neither,
            ``ElaConfig``'s default (``"ela_resnet50"``), as ``ElaConfig()`` builds it.

    ``train_transforms`` holds timm's matching training transform (random resized crop, flip) for recipes.
    """

    main_input_name = "pixel_values"
    model_input_names = ["pixel_values"]
    valid_kwargs = ElaImageProcessorKwargs  # what from_pretrained(..., **kwargs) may override

    def __init__(self, pretrained_cfg: dict[str, Any] | None = None, architecture: str | None = None, **kwargs):
        # kwargs are the other config.json keys when loaded from a model folder: not ours to keep; options
        # of other image processors would be ignored, so they are refused
        refused = sorted(k for k in kwargs if k in _OTHER_OPTIONS)
        if refused:
            raise ValueError(f"ElaImageProcessor does not take {refused}: {_OPTIONS_HINT}")
        super().__init__()
        if pretrained_cfg is None:
            from .configuration_ela import ElaConfig, _registered_architectures, default_pretrained_cfg

            if architecture is None:  # ElaConfig's default network, as ElaConfig() builds it
                architecture = ElaConfig.architecture

            registry = _registered_architectures()
            if architecture not in registry:
                raise ValueError(
                    f"architecture {architecture!r} is not an ela_hf layer-attention model; "
                    f"choose one of: {', '.join(sorted(registry))}"
                )
            pretrained_cfg = default_pretrained_cfg(architecture)
        self.architecture = architecture
        self.pretrained_cfg = pretrained_cfg  # builds the transforms (see the setter)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The data config, read-only: assign a new one to change what the processor does."""
        return _ReadOnlyDataConfig(self._pretrained_cfg)

    @pretrained_cfg.setter
    def pretrained_cfg(self, pretrained_cfg: dict[str, Any]) -> None:
        """A new data config rebuilds the transforms, so the processor always does what its config says."""
        if not isinstance(pretrained_cfg, dict) or "input_size" not in pretrained_cfg:
            raise ValueError(
                f"pretrained_cfg must be a timm data config with at least 'input_size' (and mean, std, crop_pct, "
                f"interpolation), got {pretrained_cfg!r}"
            )
        check_input_size(pretrained_cfg["input_size"])
        self._pretrained_cfg = dict(pretrained_cfg)
        self.data_config = timm.data.resolve_data_config(pretrained_cfg=self._pretrained_cfg, verbose=False)
        for key in ("mean", "std"):
            values = self.data_config[key]
            if len(values) != self.num_channels:
                raise ValueError(
                    f"the data config has input_size {list(self.data_config['input_size'])} ({self.num_channels} "
                    f"channels) but a {len(values)}-long {key} {list(values)}: give pretrained_cfg['{key}'] "
                    f"{self.num_channels} values"
                )
        # both start by converting a PIL image to the checkpoint's mode (grey checkpoints get grey images)
        convert = [_ConvertMode(mode)] if (mode := _PIL_MODES.get(self.num_channels)) else []
        self.val_transforms = _prepend(convert, timm.data.create_transform(**self.data_config, is_training=False))
        self.train_transforms = _prepend(convert, timm.data.create_transform(**self.data_config, is_training=True))

    @property
    def num_channels(self) -> int:
        return int(self.data_config["input_size"][0])

    # read-only views of the data config under the names transformers' other processors use (e.g. the
    # run_image_classification example builds its own torchvision transforms from them)
    @property
    def size(self) -> dict[str, int]:
        """The model's input size ``{"height", "width"}`` (after resize and center crop)."""
        _, height, width = self.data_config["input_size"]
        return {"height": int(height), "width": int(width)}

    @property
    def crop_size(self) -> dict[str, int]:
        return self.size

    @property
    def image_mean(self) -> list[float]:
        return [float(v) for v in self.data_config["mean"]]

    @property
    def image_std(self) -> list[float]:
        return [float(v) for v in self.data_config["std"]]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("val_transforms", "train_transforms", "data_config", "_pretrained_cfg"):
            output.pop(key, None)
        output["pretrained_cfg"] = dict(self.pretrained_cfg)
        return output

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs):
        refused = sorted(k for k in kwargs if k in _OTHER_OPTIONS)
        if refused:
            raise ValueError(f"ElaImageProcessor.from_pretrained does not take {refused}: {_OPTIONS_HINT}")
        return super().from_dict(image_processor_dict, **kwargs)

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

    def preprocess(
        self,
        images: ImageInput,
        return_tensors: str | None = "pt",
        input_data_format: str | ChannelDimension | None = None,
        data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> BatchFeature:
        """``images``: a PIL image, NumPy array or tensor, or a list of them -> ``{"pixel_values": [B, C, H, W]}``.

        Arrays and tensors may be channels-last or channels-first (``input_data_format`` says which when
        the shape does not); their pixels are read by dtype (float in [0, 1] or 0-255, bool, uint8, uint16:
        see ``_as_8_bit``). The transform is the checkpoint's: other options raise ``ValueError``.
        """
        if kwargs:
            raise ValueError(f"ElaImageProcessor does not take the options {sorted(kwargs)}: {_OPTIONS_HINT}")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(
                f"ElaImageProcessor returns PyTorch tensors ('pt', also for None) or NumPy arrays ('np'), "
                f"got return_tensors={return_tensors!r}"
            )
        if data_format not in (None, "channels_first", ChannelDimension.FIRST):
            raise ValueError(f"ElaImageProcessor returns channels-first pixel_values, got data_format={data_format!r}")
        # grey [H, W] arrays and tensors: transformers only takes them with a channel dimension
        if isinstance(images, (list, tuple)):
            images = [_with_channels(image) for image in images]
        else:
            images = _with_channels(images)
        flat = make_flat_list_of_images(images)
        if len(flat) == 0:
            raise ValueError("ElaImageProcessor got no images (an empty list)")
        pixel_values = [self.val_transforms(self._to_pil(image, input_data_format)) for image in flat]
        batch = torch.stack(pixel_values)
        if return_tensors == "np":
            return BatchFeature({"pixel_values": batch.numpy()}, tensor_type="np")
        return BatchFeature({"pixel_values": batch}, tensor_type="pt")

    def _to_pil(self, image, input_data_format) -> Image.Image:
        channels = self.num_channels
        if isinstance(image, Image.Image):
            image = _upright(image)
        else:
            if isinstance(image, torch.Tensor):
                image = image.detach().cpu()
                image = (image.float() if image.dtype in (torch.bfloat16, torch.float16) else image).numpy()
            if input_data_format is None:
                # transformers guesses 1 or 3 channels; then the checkpoint's count, then RGBA arrays
                for counts in ((1, 3, channels), (4,)):
                    try:
                        input_data_format = infer_channel_dimension_format(image, num_channels=counts)
                        break
                    except ValueError:
                        pass
                else:
                    raise ValueError(
                        f"an image of shape {tuple(image.shape)} has no axis of {sorted({1, 3, 4, channels})} "
                        f"channels: this checkpoint takes {channels}-channel images (grey and RGB ones are "
                        "converted); give [H, W], [H, W, C] or [C, H, W] images, with input_data_format= "
                        "where the channel axis is ambiguous"
                    )
            image = to_pil_image(_as_8_bit(image), input_data_format=input_data_format)
        if channels in _PIL_MODES:
            return image  # the transforms convert it
        if len(image.getbands()) != channels:
            raise ValueError(
                f"this checkpoint takes {channels}-channel images, got a {len(image.getbands())}-channel "
                f"{image.mode!r} image"
            )
        return image


_PIL_MODES = {1: "L", 3: "RGB"}


def _upright(image: Image.Image) -> Image.Image:
    """A photo turned as its EXIF orientation says, as ``datasets`` decodes training images and ``pipeline()`` loads
    them (a phone's portrait photo is stored sideways); without the tag (or once turned) the image itself."""
    from PIL import ImageOps

    if image.getexif().get(0x0112, 1) == 1:  # Orientation: 1 is upright
        return image
    return ImageOps.exif_transpose(image)


class _ReadOnlyDataConfig(dict):
    """A copy of the processor's data config that refuses edits: an edit in place would be saved with the
    processor but not change its transforms, which are built when the config is assigned."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "processor.pretrained_cfg cannot be changed in place (the transforms would not follow): assign a new "
            "one, e.g. processor.pretrained_cfg = {**processor.pretrained_cfg, 'crop_pct': 1.0}"
        )

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = __ior__ = _refuse

    def __reduce__(self):
        # copies and pickles are plain dicts, free to edit
        return dict, (dict(self),)


def _as_8_bit(image: np.ndarray) -> np.ndarray:
    """An image array as 8-bit pixels, by its dtype: float in [0, 1] (torchvision's convention: all-white
    1.0 and binary 0/1 masks included) times 255, float above 1 as 0-255 values, bool as 0/255, 16-bit
    integers scaled by 255 / 65535 like 16-bit PIL images, other integers as 0-255 values. Values out of
    those ranges (e.g. an image normalised already) are refused, naming the range."""
    kind, bits = image.dtype.kind, image.dtype.itemsize * 8
    if image.dtype == np.uint8:
        return image
    if kind == "b":
        return image.astype(np.uint8) * 255
    if kind not in "fiu":
        raise ValueError(f"an image array of dtype {image.dtype} is not a picture: give 8-bit, 16-bit or float pixels")
    low, high = (image.min(), image.max()) if image.size else (0, 0)
    if kind == "f":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("the image holds NaN or infinite values")
        if low < 0 or high > 255:
            raise ValueError(
                f"a float image must hold values in [0, 1] (or 0-255), got [{low:.4g}, {high:.4g}]: pass raw "
                "images, the processor normalises them"
            )
        return np.rint(image * 255.0 if high <= 1 else image).astype(np.uint8)
    if kind == "u" and bits == 16:
        return np.rint(image / 257.0).astype(np.uint8)
    if low < 0 or high > 255:
        raise ValueError(f"an integer image of dtype {image.dtype} must hold 0-255 values, got [{low}, {high}]")
    return image.astype(np.uint8)


def _with_channels(image):
    """A grey ``[H, W]`` array gets a channel axis (``[H, W, 1]``; a tensor ``[1, H, W]``)."""
    if getattr(image, "ndim", None) != 2:
        return image
    return image[..., None] if isinstance(image, np.ndarray) else image.unsqueeze(0)


class _ConvertMode:
    """PIL image -> ``mode`` (a class, not a lambda, so that the transforms pickle)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else _eight_bit(image).convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _eight_bit(image: Image.Image) -> Image.Image:
    """Grey images of more than 8 bits scaled to 8 bits (Pillow's own conversion clips them at 255, which turns
    most of a 16-bit image white and a float image in [0, 1] black); other images unchanged.

    16-bit (``I;16*``) images are scaled by 65535 / 255; 32-bit integer (``I``) images by their bit depth, read
    off the largest value: 8-bit values as they are, values up to 65535 as 16-bit data, larger ones as data of
    ``max.bit_length()`` bits (a 20-bit sensor's image keeps its range); float (``F``) images in [0, 1] by 255,
    others clipped to [0, 255]."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image).astype(np.float64)
    top = pixels.max(initial=0)
    if image.mode == "F":
        if top <= 1.0:
            pixels = pixels * 255.0
    elif image.mode.startswith("I;16") or 255 < top <= 65535:
        pixels = pixels / 257.0
    elif top > 65535:
        pixels = pixels * (255.0 / (2 ** int(top).bit_length() - 1))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def _prepend(first: list, transform):
    from torchvision import transforms as T

    if not first:
        return transform
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    return T.Compose(first + steps)
