"""ELA model configuration: one `config.json` for transformers and for timm.

The serialised config carries both sets of keys (DESIGN.md, "one checkpoint format serves both front
doors"):

- transformers: ``model_type``, ``architectures``, ``id2label``/``label2id`` and the fields below;
- timm (``timm.create_model("local-dir:<dir>")`` / ``"hf-hub:<repo>"``): ``architecture``,
  ``num_classes``, ``pretrained_cfg`` (the data config: input size, mean/std, crop) and ``model_args``
  (the constructor arguments timm passes back to the model, with ``skip_mask`` when the checkpoint is
  slim).
"""
from __future__ import annotations

import copy
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from ela_hf.models.ela_resnet import check_input_size

__all__ = ["ElaConfig"]

# pretrained_cfg keys that describe where weights came from, not how to feed the model
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")
# transformers classes whose checkpoints have no classifier (timm must build them with num_classes=0)
HEADLESS_ARCHITECTURES = ("ElaModel", "ElaBackbone")
# timm-only top-level keys: rebuilt from the fields by `to_dict`, never stored twice
# timm.create_model's features_only arguments (a feature wrapper instead of the network)
_FEATURE_KEYS = ("features_only", "feature_cls", "feature_cfg", "out_indices")
_TIMM_TOP_LEVEL_KEYS = ("num_classes", "num_features", "global_pool", "label_names", "label_descriptions")


def _registered_architectures() -> dict[str, dict[str, Any]]:
    from ela_hf.models import MODEL_ARGS

    return MODEL_ARGS


def default_pretrained_cfg(architecture: str) -> dict[str, Any]:
    """timm's default data config of ``architecture``, without its download source."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(architecture)
    if cfg is None:
        return {}
    out = {}
    for key, value in cfg.to_dict().items():
        if key in _SOURCE_KEYS or value is None and key not in ("pool_size", "first_conv", "classifier"):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# from_pretrained keyword arguments that ElaConfig checks or adjusts when it is built (see ElaConfig.from_dict)
_CHECKED_AT_CONSTRUCTION = (
    "architecture", "skip_mask", "num_channels", "drop_rate", "drop_path_rate", "model_args", "id2label",
    "out_features", "out_indices",
)


@strict
class ElaConfig(BackboneConfigMixin, PretrainedConfig):
    r"""Configuration of an ELA / MRLA layer-attention ResNet (:class:`ElaModel`, :class:`ElaForImageClassification`).

    The network itself is the timm model ``timm.create_model(architecture, **model_args)`` registered by
    ``import ela_hf``; this config says which one and how to build it.

    Args:
        architecture (`str`, *optional*, defaults to `"ela_resnet50"`):
            A layer-attention model registered with timm by ``ela_hf`` (see ``ela_hf.models.MODEL_ARGS``), e.g.
            ``"ela_resnet50"``, ``"mrla_l_resnet101"``, ``"ela_resnet56_cifar"``; the plain ``"resnetN_cifar"``
            baselines are accepted too (they have no attention layers and no skip mask).
        num_labels (`int`, *optional*):
            Number of classes of the classification head. Defaults to the architecture's ``pretrained_cfg``
            (1000 for the ImageNet nets, 100 for the CIFAR nets) unless ``id2label`` is given.
        skip_mask (`list[list[bool]]`, *optional*):
            One list of bools per stage, one entry per block; ``True`` means that block's attention layer is
            skipped (ELA). The first block of every stage can never be skipped. ``None`` means no layer is
            skipped. This is the mask the model *runs* with; whether the skipped layers' parameters exist is
            decided by ``model_args["skip_mask"]`` (see ``slim``).
        slim (`bool`, *optional*, defaults to `False`):
            Init-only switch: build the skipped attention layers without parameters (sets
            ``model_args["skip_mask"] = skip_mask``). Slim releases (``ela_hf.export_pruned``) are loaded this way.
            Read back as ``config.is_slim``.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels (timm's ``in_chans``); ``pixel_values`` must have this many channels.
        drop_rate (`float`, *optional*, defaults to 0.0):
            Dropout before the classifier (timm's ``drop_rate``).
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth on the attention branch, linear over the blocks (the paper's recipes use 0.2).
        model_args (`dict[str, Any]`, *optional*):
            Further keyword arguments for ``timm.create_model`` (e.g. ``{"dim_per_head": 32}``). The key
            ``"skip_mask"`` here is timm's structural mask: those attention layers are not built at all, and
            it must be contained in ``skip_mask``. In ``config.json`` this key holds every constructor argument
            timm needs (``num_classes``, ``in_chans``, the structural mask), so timm rebuilds the same network.
        pretrained_cfg (`dict[str, Any]`, *optional*):
            timm's data config (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ...). Defaults to
            the architecture's; the image processor (:class:`ElaImageProcessor`) and timm's
            ``resolve_data_config`` read it.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Unused by the convolutional layers (they use timm's Kaiming init); kept for transformers utilities
            that expect it.
        out_features (`list[str]`, *optional*):
            For :class:`ElaBackbone` (``AutoBackbone``): which of ``stage_names`` (``"stem"``, ``"stage1"``, ...)
            to return as feature maps. Defaults to the last stage.
        out_indices (`list[int]`, *optional*):
            The same choice by index into ``stage_names``; give one of the two.

    Example:
    ```python
    >>> import ela_hf
    >>> from ela_hf import ElaConfig, ElaForImageClassification
    >>> config = ElaConfig(architecture="ela_resnet20_cifar", num_labels=10)
    >>> model = ElaForImageClassification(config)
    ```
    """

    model_type = "ela"

    architecture: str = "ela_resnet50"
    skip_mask: list | None = None
    num_channels: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    model_args: dict | None = None
    pretrained_cfg: dict | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        registry = _registered_architectures()
        if self.architecture not in registry:
            raise ValueError(
                f"architecture {self.architecture!r} is not an ela_hf layer-attention model; "
                f"choose one of: {', '.join(sorted(registry))}"
            )
        slim = bool(kwargs.pop("slim", False))
        model_args = dict(self.model_args or {})
        # timm's feature-extractor switches: built with them, the network is a FeatureListNet the models cannot run
        features = sorted(k for k in _FEATURE_KEYS if k in model_args and (k != "features_only" or model_args[k]))
        if features:
            raise ValueError(
                f"model_args {features} (timm's features_only switches) are not taken by ElaConfig: the transformers "
                "models wrap the whole network; for feature maps use ElaBackbone (AutoBackbone) and choose them "
                "with ElaConfig(out_features=...) or ElaConfig(out_indices=...)"
            )
        pretrained_cfg = copy.deepcopy(self.pretrained_cfg) or default_pretrained_cfg(self.architecture)

        # timm's keys (from a config.json written by us or by timm): fold them into the fields.
        timm_num_classes = kwargs.pop("num_classes", None)
        args_num_classes = model_args.pop("num_classes", None)
        if timm_num_classes is None:
            timm_num_classes = args_num_classes
        label_names = kwargs.pop("label_names", None)
        for key in _TIMM_TOP_LEVEL_KEYS:
            kwargs.pop(key, None)
        if "in_chans" in model_args:
            in_chans = model_args.pop("in_chans")  # checked below, with num_channels
            if self.num_channels != 3 and in_chans != self.num_channels:
                raise ValueError(f"num_channels={self.num_channels} disagrees with model_args in_chans={in_chans}")
            self.num_channels = in_chans
        for key in ("drop_rate", "drop_path_rate"):
            if key in model_args:
                setattr(self, key, float(model_args.pop(key)))
        pretrained_cfg.pop("num_classes", None)
        pretrained_cfg.pop("architecture", None)

        if self.id2label is None and kwargs.get("num_labels") is None:
            if label_names:
                self.id2label = dict(enumerate(label_names))
                if len(set(label_names)) == len(label_names):
                    self.label2id = {name: i for i, name in enumerate(label_names)}
            elif timm_num_classes is not None:
                kwargs["num_labels"] = int(timm_num_classes)
            else:
                kwargs["num_labels"] = registry_num_classes(self.architecture)

        # masks: the run-time mask (skip_mask) contains the structural one (model_args["skip_mask"])
        stage_sizes = list(model_args.get("layers") or registry[self.architecture]["layers"])
        has_attention = (model_args.get("attn_type", registry[self.architecture]["attn_type"]) is not None)
        structural = model_args.get("skip_mask")
        if self.skip_mask is not None:
            self.skip_mask = _checked_mask(self.skip_mask, stage_sizes, has_attention, "skip_mask")
        if structural is not None:
            structural = _checked_mask(structural, stage_sizes, has_attention, 'model_args["skip_mask"]')
            if self.skip_mask is None:
                self.skip_mask = [list(s) for s in structural]
            missing = [
                (i, j)
                for i, stage in enumerate(structural)
                for j, absent in enumerate(stage)
                if absent and not self.skip_mask[i][j]
            ]
            if missing:
                raise ValueError(
                    f'model_args["skip_mask"] removes attention layers {missing} (stage, block) that skip_mask '
                    "says are active; a layer without parameters cannot run"
                )
            model_args["skip_mask"] = structural
        if slim:
            if self.skip_mask is None:
                raise ValueError("slim=True needs a skip_mask (which attention layers to build without parameters)")
            model_args["skip_mask"] = [list(s) for s in self.skip_mask]
        self.model_args = model_args or None
        self.pretrained_cfg = pretrained_cfg
        # backbone outputs (AutoBackbone): the stem, then one feature map per stage
        kwargs.pop("stage_names", None)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(stage_sizes) + 1)]
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        for name, value in (("out_features", out_features), ("out_indices", out_indices)):
            if isinstance(value, (list, tuple)) and not value:
                # an ElaBackbone that returns no feature map (its forward failed inside timm: "max() arg is an empty
                # sequence")
                raise ValueError(
                    f"{name} is empty: name at least one of stage_names {self.stage_names} "
                    "(or leave it None for the last stage)"
                )
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)
        if self.id2label and sorted(self.id2label) != list(range(len(self.id2label))):
            # the classifier's logit i is class i: other keys leave logits without a label (and timm's
            # label_names, written in key order, would name them differently from transformers)
            raise ValueError(f"id2label must have the keys 0..{len(self.id2label) - 1} (one per logit), got "
                             f"{sorted(self.id2label)}")
        if isinstance(self.num_channels, bool) or not isinstance(self.num_channels, numbers.Integral):
            raise TypeError(
                f"num_channels (timm's in_chans) must be an int, got {self.num_channels!r} "
                f"({type(self.num_channels).__name__})"
            )
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {self.num_channels}")
        self.num_channels = int(self.num_channels)
        input_size = self.pretrained_cfg.get("input_size")
        if input_size is not None:
            check_input_size(input_size)
            self.pretrained_cfg["input_size"] = [self.num_channels, *list(input_size)[1:]]
        for key in ("mean", "std"):
            if self.pretrained_cfg.get(key) is not None:
                self.pretrained_cfg[key] = _fit_to_channels(self.pretrained_cfg[key], self.num_channels)

    def __setattr__(self, key, value):
        # the data config, the default label count and the mask checks are derived from the architecture when the
        # config is built: a later reassignment would leave them those of the old one (another input size, mean
        # and std for the image processor), silently
        if (key == "architecture" and self.__dict__.get("_post_init_done")
                and value != self.__dict__.get("architecture")):
            raise ValueError(
                f"config.architecture cannot be changed after the config is built ({self.__dict__.get('architecture')!r} "
                f"-> {value!r}): its data config, labels and mask checks were derived from it; build a new one, "
                f"ElaConfig(architecture={value!r}, ...), or pass architecture= to from_pretrained"
            )
        super().__setattr__(key, value)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # transformers sets from_pretrained's keyword arguments on the finished config, past __post_init__'s
        # checks and adjustments (a grey model's data config, id2label's keys): ours go into the dict the config
        # is built from instead. (Not pretrained_cfg: AutoImageProcessor hands its own to AutoConfig and would
        # turn our error into "Unrecognized image processor"; the processor and the network check it.)
        config_dict = dict(config_dict)
        picked = {key for key in _CHECKED_AT_CONSTRUCTION if key in kwargs}
        for key in _CHECKED_AT_CONSTRUCTION:
            if key not in kwargs:
                continue
            value = kwargs.pop(key)
            if key == "num_channels":  # the channel count asked for wins over the one stored with the weights
                config_dict["model_args"] = {
                    k: v for k, v in (config_dict.get("model_args") or {}).items() if k != "in_chans"
                }
            if key == "id2label" and "label2id" not in kwargs:  # the stored names belong to the stored labels
                config_dict.pop("label_names", None)
                names = [str(v) for v in (value or {}).values()]
                config_dict["label2id"] = (
                    {str(v): int(k) for k, v in value.items()} if len(set(names)) == len(names) else None
                )
            config_dict[key] = value
        for key, other in (("out_features", "out_indices"), ("out_indices", "out_features")):
            if key in config_dict and other in config_dict and key in picked and other not in picked:
                # a new choice of feature maps replaces the stored one (config.json holds both, which would
                # then disagree: transformers' own backbones take out_features= on a saved folder)
                config_dict.pop(other)
        return super().from_dict(config_dict, **kwargs)

    # ----------------------------------------------------------------------------------------------
    @property
    def stage_sizes(self) -> list[int]:
        """Blocks per stage of the architecture."""
        return list((self.model_args or {}).get("layers") or _registered_architectures()[self.architecture]["layers"])

    @property
    def depths(self) -> list[int]:
        """Blocks per stage (transformers' name for :attr:`stage_sizes`, as in ``ResNetConfig``)."""
        return self.stage_sizes

    @property
    def hidden_sizes(self) -> list[int]:
        """Output channels of each stage (as ``ResNetConfig.hidden_sizes``; heads built on a backbone config
        read the last one)."""
        args = {**_registered_architectures()[self.architecture], **(self.model_args or {})}
        expansion = 4 if args.get("block", "bottleneck") == "bottleneck" else 1
        return [int(c) * expansion for c in args.get("channels", (64, 128, 256, 512))]

    @property
    def is_slim(self) -> bool:
        """True when some skipped attention layers are built without parameters (a slim release)."""
        structural = (self.model_args or {}).get("skip_mask")
        return bool(structural) and any(any(stage) for stage in structural)

    def timm_model_args(self, num_classes: int | None = None) -> dict[str, Any]:
        """Keyword arguments that rebuild this network with ``timm.create_model(self.architecture, **args)``.

        Drop rates are left out (they are training settings, as in timm's own exports).
        """
        args = dict(self.model_args or {})
        args["num_classes"] = self.num_labels if num_classes is None else num_classes
        args["in_chans"] = self.num_channels
        return args

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # ElaModel / ElaBackbone checkpoints have no classifier: timm must build them with num_classes=0.
        headless = bool(self.architectures) and all(a in HEADLESS_ARCHITECTURES for a in self.architectures)
        num_classes = 0 if headless else self.num_labels
        output["model_args"] = self.timm_model_args(num_classes)
        output["num_classes"] = num_classes
        pretrained_cfg = dict(output.get("pretrained_cfg") or {})
        pretrained_cfg["num_classes"] = num_classes
        pretrained_cfg["architecture"] = self.architecture
        output["pretrained_cfg"] = pretrained_cfg
        if self.id2label and not all(v == f"LABEL_{k}" for k, v in self.id2label.items()):
            output["label_names"] = [self.id2label[i] for i in sorted(self.id2label)]
        return output


def registry_num_classes(architecture: str) -> int:
    return int(default_pretrained_cfg(architecture).get("num_classes", 1000))


def _fit_to_channels(values: Any, num_channels: int) -> Any:
    """A data config's per-channel ``mean``/``std`` for ``num_channels`` inputs.

    RGB values for one channel become their average (a grey image's statistics); one value is repeated.
    Any other mismatch is kept as given: the image processor refuses it with an error naming it.
    """
    if isinstance(values, (int, float)) or len(values) == num_channels:
        return values
    values = [float(v) for v in values]
    if num_channels == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return values * num_channels
    return values


def _checked_mask(mask: Any, stage_sizes: list[int], has_attention: bool, name: str) -> list[list[bool]]:
    from ela_hf.models import validate_skip_mask

    if not has_attention:
        raise ValueError(f"{name} was given but this architecture has no attention layers to skip")
    try:
        return validate_skip_mask(mask, stage_sizes)
    except ValueError as err:
        raise ValueError(f"{name} does not fit the architecture: {err}") from None
