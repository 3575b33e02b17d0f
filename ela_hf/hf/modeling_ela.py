"""transformers models around the timm layer-attention ResNets.

The network is the timm model itself (``self.timm_model``), so the weights keep timm's key names. A
checkpoint conversion mapping registered for ``model_type="ela"`` adds the ``timm_model.`` prefix when
loading and removes it when saving, so ``model.safetensors`` holds plain timm keys (``layer1.0.conv1.weight``)
and ``timm.create_model("local-dir:<dir>", pretrained=True)`` reads the same file. transformers'
``TimmWrapper`` uses the same arrangement.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
import socket
import tempfile
import warnings
from typing import Any

import timm
import torch
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from ela_hf.layers.mrla import MrlaLight, _LayerAttentionBase
from ela_hf.models import find_stages, get_skip_mask, keep_kl_statistics_out_of_ddp, set_skip_mask
from ela_hf.models.ela_resnet import (
    LayerAttentionResNet,
    _LayerAttentionBlockMixin,
    _other_attention_type_hint,
    _some,
    _unexpected_weights,
    validate_skip_mask,
)

from .configuration_ela import ElaConfig

__all__ = ["ElaPreTrainedModel", "ElaModel", "ElaForImageClassification", "ElaBackbone"]

TIMM_PREFIX = "timm_model"
CLASSIFIER_PREFIX = "fc."


def build_timm_network(config: ElaConfig, num_classes: int) -> LayerAttentionResNet:
    """``timm.create_model`` for ``config``: structural mask from ``model_args``, run-time mask applied on top."""
    kwargs = config.timm_model_args(num_classes)
    model = timm.create_model(
        config.architecture,
        pretrained=False,
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
        pretrained_cfg_overlay=dict(config.pretrained_cfg or {}, num_classes=num_classes),
        **kwargs,
    )
    if config.skip_mask is not None:
        set_skip_mask(model, config.skip_mask)
    return model


def _under_prefix(matcher: Any, prefix: str) -> Any:
    """A timm ``group_matcher`` (regexes, possibly in lists of ``(regex, index)`` pairs) for parameters named
    ``prefix + <timm name>``. timm matches them from the start of the name (``re.match``), every alternative."""
    if isinstance(matcher, str):
        alternatives = re.sub(r"(^|[|])[\^]", r"\1", matcher)  # each alternative's own anchor goes
        return "^" + re.escape(prefix) + "(?:" + alternatives + ")"
    if isinstance(matcher, dict):
        return {k: _under_prefix(v, prefix) for k, v in matcher.items()}
    if isinstance(matcher, (list, tuple)):
        return type(matcher)(_under_prefix(v, prefix) if isinstance(v, (str, list, tuple)) else v for v in matcher)
    return matcher


def _selected_hidden_states(output_hidden_states: Any) -> list[int] | None:
    """The hidden-state indices ``output_hidden_states`` selects (transformers 5: an index or a list of them,
    negative ones counted from the end), or None when it is a flag; anything else is refused by name."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return None
    if isinstance(output_hidden_states, numbers.Integral):
        return [int(output_hidden_states)]
    if isinstance(output_hidden_states, (list, tuple)) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in output_hidden_states
    ):
        return [int(i) for i in output_hidden_states]
    raise ValueError(
        "output_hidden_states must be True/False, a hidden-state index or a list of indices (0 = the stem, "
        f"i = stage i; negative ones count from the end), got {output_hidden_states!r}"
    )


def _keep_selected(hidden_states: tuple, selected: list[int] | None) -> tuple:
    """All hidden states, with None in place of those ``selected`` leaves out (transformers' convention: the
    positions stay those of the full tuple; indices out of range select nothing)."""
    if selected is None:
        return hidden_states
    n = len(hidden_states)
    keep = {i % n for i in selected if -n <= i < n}
    return tuple(h if i in keep else None for i, h in enumerate(hidden_states))


class ElaPreTrainedModel(PreTrainedModel):
    """Base class: config handling, weight init matching timm's, and the skip-mask interface."""

    config: ElaConfig
    config_class = ElaConfig
    base_model_prefix = TIMM_PREFIX
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # the MRLA-B key/value cache lives inside a stage: never split one across devices
    _no_split_modules = ["LayerAttentionStage"]
    # frozen BatchNorm layers (detection training) save no step counters; they are not weights
    _keys_to_ignore_on_load_missing = [r"num_batches_tracked"]
    supports_gradient_checkpointing = True
    # the Trainer must not pass `num_items_in_batch` to forward
    accepts_loss_kwargs = False

    timm_model: LayerAttentionResNet

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (stem, then blocks) under this model's parameter names, so timm's layer-wise
        lr decay (``timm.optim.create_optimizer_v2(model, "adamw", layer_decay=0.75)``) groups this model as it
        groups ``model.timm_model``."""
        return _under_prefix(self.timm_model.group_matcher(coarse=coarse), f"{TIMM_PREFIX}.")

    # ----------------------------------------------------------------------------------------------
    # initialisation: the same distributions as the timm constructor, so a model built from a config
    # and one created by timm are statistically identical (and missing keys get the right init)
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Linear)):
            # PyTorch's own default (reset_parameters), which the timm model keeps for these layers
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if module.num_batches_tracked is not None:
                init.zeros_(module.num_batches_tracked)
        if isinstance(module, MrlaLight):
            init.normal_(module.lam, mean=0.0, std=1.0)
        if isinstance(module, _LayerAttentionBase):
            # KL accumulators are non-persistent: never in a checkpoint, always start at zero
            module.kl_sum.zero_()
            module.kl_count.zero_()
        if isinstance(module, _LayerAttentionBlockMixin):
            # children are initialised first, so this zeroes the last BN of the residual branch as timm does
            last_bn = getattr(module, "bn3", None) or getattr(module, "bn2", None)
            zero_init_last = (self.config.model_args or {}).get("zero_init_last", True)
            if zero_init_last and last_bn is not None and last_bn.weight is not None:
                init.zeros_(last_bn.weight)
            if module.attn_type is not None:
                init.constant_(module.attn_skipped, module.is_skipped)

    @classmethod
    def from_timm_resnet(
        cls,
        resnet: nn.Module | dict[str, torch.Tensor],
        architecture: str,
        output_loading_info: bool = False,
        **config_kwargs,
    ):
        """A model whose backbone is copied from a plain timm/torchvision ResNet, attention layers fresh.

        ``architecture`` names the ELA variant (``"ela_resnet50"`` for a ResNet-50, ``"ela_resnet20_cifar"``
        for ``"resnet20_cifar"``); further keyword arguments go to :class:`ElaConfig`. Without ``num_labels``
        or ``id2label`` the ResNet's classifier size is kept, and so is its classifier. With
        ``output_loading_info=True`` returns ``(model, ResNetInitReport)``. Shape mismatches raise ``ValueError``.
        """
        from ela_hf.models.from_resnet import _state_dict_of, init_from_resnet

        state = _state_dict_of(resnet)
        if "num_labels" not in config_kwargs and "id2label" not in config_kwargs:
            head = state.get(CLASSIFIER_PREFIX + "weight")
            if head is not None and head.ndim == 2:
                config_kwargs["num_labels"] = int(head.shape[0])
        model = cls(ElaConfig(architecture=architecture, **config_kwargs))
        report = init_from_resnet(model, state)
        return (model, report) if output_loading_info else model

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1, *args, **kwargs
    ) -> None:
        # checkpointing is per stage (the MRLA-B cache cannot be split between blocks), always non-reentrant
        self.gradient_checkpointing = enable  # the timm network's switch (see the property)
        options = dict(getattr(gradient_checkpointing_func, "keywords", None) or {})
        unused = {k: v for k, v in options.items() if k != "use_reentrant" or v}
        if every_n_layers != 1:
            unused["every_n_layers"] = every_n_layers
        inner = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
        if gradient_checkpointing_func is not None and inner is not torch.utils.checkpoint.checkpoint:
            unused["checkpoint function"] = getattr(inner, "__qualname__", repr(inner))  # e.g. offload=True
        if enable and unused:
            warnings.warn(
                f"{type(self).__name__} checkpoints whole stages with torch.utils.checkpoint(use_reentrant=False); "
                f"the activation checkpointing options {unused} are not used"
            )

    @property
    def gradient_checkpointing(self) -> bool:
        """The timm network's per-stage checkpointing switch. transformers reads this attribute
        (``is_activation_checkpointing``, the Trainer) and a parent model's ``gradient_checkpointing_enable``
        sets it on every submodule that has it (an ElaBackbone inside DETR or UperNet), so setting it switches
        the network."""
        net = self._modules.get("timm_model")
        return bool(getattr(net, "grad_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        net = self._modules.get("timm_model")
        if net is None:
            raise AttributeError("gradient_checkpointing is set on the timm network, which is not built yet")
        net.set_grad_checkpointing(bool(enable))

    def get_input_embeddings(self):
        return None

    # ----------------------------------------------------------------------------------------------
    # skip mask
    @property
    def skip_mask(self) -> list[list[bool]] | None:
        """One list of bools per stage (True = attention layer skipped); None for a plain ResNet."""
        return self.timm_model.skip_mask

    def set_skip_mask(self, mask: list[list[bool]]) -> None:
        """Skip attention layers in place (parameters kept; cumulative) and record the mask in the config."""
        set_skip_mask(self, mask)  # calls _skip_mask_changed

    def _skip_mask_changed(self) -> None:
        """Called by ``ela_hf.set_skip_mask`` on any module containing this model: keep the config's mask current."""
        _mask_into_config(self.timm_model, self.config)

    def post_init(self):
        super().post_init()
        # a state dict loaded into this model (Trainer resume, load_best_model_at_end, a user's
        # load_state_dict, also through a parent module) carries its skip flags: the config follows them
        # (on the timm network itself, so that its own load_state_dict, as in sharing weights with a timm model,
        # updates the config too; the network keeps the config, a plain attribute that copies follow)
        self.timm_model._ela_config = self.config
        self.timm_model.register_load_state_dict_post_hook(_config_follows_loaded_mask)
        keep_kl_statistics_out_of_ddp(self)  # with the wrapper's prefix: DDP reads the module it wraps

    def _forward_features(self, pixel_values, output_hidden_states):
        """Final feature map and, when asked (argument or config), the stem and stage outputs."""
        pixel_values = self._check_pixel_values(pixel_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        selected = _selected_hidden_states(output_hidden_states)
        if output_hidden_states or selected:  # (index 0, the stem, is an index here, not False)
            features, intermediates = self.timm_model.forward_intermediates(pixel_values)
            return features, _keep_selected(tuple(intermediates), selected)
        return self.timm_model.forward_features(pixel_values), None

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        if pixel_values is None:
            raise ValueError("pixel_values is required (a [batch, channels, height, width] image tensor)")
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__module__}.{type(pixel_values).__name__}; "
                "run the image processor (AutoImageProcessor / ElaImageProcessor, return_tensors='pt') on the images, "
                "or convert normalised arrays with torch.from_numpy"
            )
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape [batch, {self.config.num_channels}, height, width], "
                f"got shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but this model expects "
                f"{self.config.num_channels} (config.num_channels); input shape {tuple(pixel_values.shape)}, "
                "images must be channels-first"
            )
        if not torch.is_floating_point(pixel_values):
            # raw 0-255 pixels would run through the network as if they were normalised values
            raise ValueError(
                f"pixel_values must be a floating-point tensor of normalised images, got {pixel_values.dtype}; "
                "run the image processor (AutoImageProcessor / ElaImageProcessor) on the images first"
            )
        return pixel_values.to(self.dtype)

    # ----------------------------------------------------------------------------------------------
    # checkpoints
    def load_state_dict(self, state_dict, *args, **kwargs):
        """Accept timm key names (as in ``model.safetensors``), e.g. when the Trainer resumes a checkpoint."""
        state_dict = {k if k.startswith(TIMM_PREFIX + ".") else f"{TIMM_PREFIX}.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """transformers' ``save_pretrained`` writing timm's key names and the current skip mask.

        transformers only strips the ``timm_model.`` prefix for models that went through
        ``from_pretrained``; stripping it here makes every save (fresh model, Trainer checkpoint) the same
        format. Training checkpoints keep every parameter, including those of skipped layers (resume needs
        them); ``ela_hf.export_pruned`` writes the slim release.
        """
        # the run-time mask may have changed since construction (pruning during training)
        if self.timm_model.attn_type is not None:
            self.config.skip_mask = get_skip_mask(self.timm_model)
        if state_dict is None:
            state_dict = self.state_dict()
        state_dict = {_strip_prefix(k): v for k, v in state_dict.items()}
        writes = kwargs.get("is_main_process", True)
        if hasattr(self, "should_save_on_this_rank"):  # under torch.distributed only rank 0 writes
            writes = self.should_save_on_this_rank(writes)
        if writes and kwargs.get("variant"):
            _check_variant_shares_the_mask(save_directory, self.config, get_skip_mask(self.timm_model)
                                           if self.timm_model.attn_type is not None else None,
                                           kwargs["variant"])
        plain = (
            not writes
            or os.path.isfile(save_directory)  # transformers' own error
            or kwargs.get("variant")  # model.<variant>.safetensors sits next to the default files on purpose
            or kwargs.get("push_to_hub")  # transformers pushes the folder it saved into
        )
        if plain:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        # Save into a hidden folder inside, then move the files in (see _move_in): the folder loads the
        # earlier save, complete, until the new one is complete, never a half-written file or a mix of the
        # two saves' shards. An interrupted save leaves a hidden folder that the next save here deletes.
        os.makedirs(save_directory, exist_ok=True)
        _remove_abandoned_folders(save_directory)
        prefix = f"{_SAVE_PREFIX}{_process_tag()}-"
        with tempfile.TemporaryDirectory(prefix=prefix, dir=save_directory) as tmp:
            result = super().save_pretrained(tmp, *args, state_dict=state_dict, **kwargs)
            _move_in(tmp, save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, plus the checks a layer-attention checkpoint needs.

        Raises ``ValueError`` when the weights miss parameters the config says exist (e.g. a slim file
        whose config lost its mask), when the skip flags stored with the weights disagree with the
        config's ``skip_mask``, or when the weight file is corrupt.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as err:  # noqa: BLE001 - re-raised with the file named, or unchanged
            _raise_for_unreadable_weights(pretrained_model_name_or_path, err, kwargs.get("subfolder") or "")
            raise
        model._check_loaded_weights(info, pretrained_model_name_or_path,
                                    names_mask=_names_a_mask(pretrained_model_name_or_path, kwargs))
        return (model, info) if output_loading_info else model

    def _check_loaded_weights(self, info: dict[str, Any], source, names_mask: bool = True) -> None:
        # (BatchNorm step counters are not reported missing: _keys_to_ignore_on_load_missing)
        missing = sorted(_strip_prefix(k) for k in info.get("missing_keys", ()) if not _is_head_key(k))
        unexpected = sorted(_strip_prefix(k) for k in info.get("unexpected_keys", ()) if not _is_head_key(k))
        model_keys = list(self.timm_model.state_dict())
        gone = set(missing)
        in_file = [k for k in model_keys if k not in gone and not k.endswith("num_batches_tracked")] + unexpected
        other_type, extra = _unexpected_weights(model_keys, unexpected, CLASSIFIER_PREFIX)
        other = _other_attention_type_hint(model_keys, in_file, missing, other_type, self.config.architecture)
        if other is not None:
            # e.g. MRLA-B weights loaded as an MRLA-L architecture (no lam), or MRLA-L's under MRLA-B (lam left over)
            raise ValueError(f"the weights in {source} do not fit the model's attention layers: {other}.")
        if extra and not missing:
            raise ValueError(
                f"the weights in {source} hold {len(extra)} parameters and buffers the model does not have, e.g. "
                f"{extra[:4]}: weights of a deeper network or another architecture than "
                f"{self.config.architecture!r} (transformers would only log them as unused)."
            )
        if missing:
            attention = [k for k in missing if ".attn." in k]
            if attention and len(attention) == len(missing):
                hint = (
                    " The config marks these attention layers active but the file has no weights for them: a slim "
                    "checkpoint needs its skip mask in config.json (model_args['skip_mask'])."
                )
            else:  # (a slim file lacks attention weights only)
                hint = (
                    f" {len(missing) - len(attention)} of them lie outside the attention layers: the weights are "
                    f"of another architecture or depth than {self.config.architecture!r}, or incomplete."
                )
            raise ValueError(
                f"the weights in {source} miss {len(missing)} parameters the config says exist, "
                f"e.g. {missing[:4]}.{hint}"
            )
        if self.timm_model.attn_type is None:
            return
        # the transformers loader copies tensors without calling the blocks' load hooks (and its eval() makes the
        # blocks run what the loaded flags say): compare the loaded `attn_skipped` flags with config.skip_mask
        stages = find_stages(self.timm_model)
        flags = [[bool(blk.attn_skipped) for blk in stage] for stage in stages]
        if self.config.skip_mask is None or not names_mask:
            # a config.json that names no mask beyond the layers not built (timm's save_for_hf / push_to_hf_hub of a
            # model pruned in place, slim or not): the flags stored with the weights are the mask, as timm's
            # loader reads them (and refuses a skipped first block, as timm's loader does)
            try:
                validate_skip_mask(flags, [len(stage) for stage in stages])
            except ValueError as err:
                raise ValueError(f"the skip flags stored with the weights in {source}: {err}") from None
            for stage, stage_flags in zip(stages, flags):
                for blk, skipped in zip(stage, stage_flags):
                    if skipped and not blk.is_skipped:
                        blk.skip_attention()
            self._skip_mask_changed()
            disagree = [(i, j) for i, stage in enumerate(stages) for j, blk in enumerate(stage)
                        if not flags[i][j] and blk.is_skipped]
        else:
            disagree = [(i, j) for i, stage in enumerate(self.config.skip_mask) for j, skipped in enumerate(stage)
                        if flags[i][j] != bool(skipped)]
        if disagree:
            raise ValueError(
                f"the config's skip_mask (config.json of {source}, or skip_mask= given to from_pretrained) and "
                f"the weights' skip flags disagree on which attention layers are skipped (stage, block) {disagree}: "
                f"the config says {self.config.skip_mask}; a checkpoint's mask cannot be changed at load time "
                "(set_skip_mask after loading can skip more)"
            )


def _names_a_mask(source, kwargs: dict) -> bool:
    """Whether the checkpoint's config.json (or the caller, with ``skip_mask=`` or ``config=``) names a run-time
    skip mask. timm's own config.json does not (only ``model_args``' layers not built): the weights' skip flags
    are then the mask. Unknown counts as named, so that a disagreement stays an error."""
    if "skip_mask" in kwargs or isinstance(kwargs.get("config"), PretrainedConfig):
        return True
    try:
        from transformers.utils import cached_file

        hub = ("cache_dir", "revision", "subfolder", "token", "local_files_only", "force_download", "proxies")
        path = cached_file(str(source), "config.json", **{k: kwargs[k] for k in hub if k in kwargs})
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("skip_mask") is not None
    except Exception:  # noqa: BLE001 - unreadable here: keep the strict check
        return True


# any weight file transformers may have written, variants included (model.fp16.safetensors, ...)
_ANY_WEIGHT_FILE = re.compile(
    r"((model|pytorch_model)([.-][\w-]+)*\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)\.index(\.\w+)?\.json)"
)
_WEIGHT_FILE = re.compile(
    r"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json)"
)


_SAVE_PREFIX = ".save-"
# working folders named after the process writing them (<host>-<pid>-), then tempfile's 8 random characters:
# .save-<host>-<pid>-xxxxxxxx
_PROCESS_TAGGED = r"(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}"
_SAVE_FOLDER = re.compile(re.escape(_SAVE_PREFIX) + _PROCESS_TAGGED)


def _remove_abandoned_folders(folder, pattern: re.Pattern = _SAVE_FOLDER) -> None:
    """Delete the working folders in ``folder`` named by ``pattern`` (default: those of saves into ``folder``)
    whose process died before removing them (killed, out of memory).

    Only folders of this host's processes that no longer exist: a save running elsewhere keeps its folder.
    """
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match is not None and entry.is_dir(follow_symlinks=False) and _process_gone(match["host"], match["pid"]):
            shutil.rmtree(entry.path, ignore_errors=True)


def _process_tag() -> str:
    """``<host>-<pid>`` of this process, as hidden working folders are named (see :func:`_process_gone`)."""
    return f"{_host_tag()}-{os.getpid()}"


def _host_tag() -> str:
    """This host as working folders name it: its name and, where the system says, its PID namespace
    (``<name>~<namespace>``): a container that shares the host's name and a folder with us numbers its
    processes apart, so its PIDs cannot be checked here."""
    namespace = _pid_namespace()
    return socket.gethostname() if namespace is None else f"{socket.gethostname()}~{namespace}"


def _pid_namespace() -> int | None:
    """The PID namespace of this process (Linux), None where the system does not say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_gone(host: str, pid) -> bool:
    """The process ``pid`` of ``host`` no longer exists (False for other hosts and other PID namespaces: their
    processes cannot be checked from here)."""
    if host != _host_tag():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


# the default weight files in the order transformers' from_pretrained (and the Trainer's resume) looks for
# them in a folder: the first one present is the one read
_LOAD_ORDER = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# an earlier save's shard kept under another name while a new save replaces the shard (see _keep_shards_read)
_KEPT_SHARD = re.compile(r"\.replaced-[0-9a-f]{8}-.+")


def _read_first(names) -> str | None:
    """Of the weight files ``names``, the one transformers reads (an index for sharded weights)."""
    return next((name for name in _LOAD_ORDER if name in names), None)


# what reading a weight index raises when it is missing, not JSON, or not an index
_INDEX_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _index_shards(path) -> list[str]:
    """The shard files the weight index at ``path`` names (``_INDEX_ERRORS`` when it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def _files_read(folder) -> list[str]:
    """The default weight files transformers loads from ``folder``: its single file, or the shards its index
    names (not leftovers beside them); empty when there are none or the index is unreadable."""
    first = _read_first(_weight_files(folder))
    if first is None or not first.endswith(".json"):
        return [] if first is None else [first]
    try:
        return _index_shards(os.path.join(folder, first))
    except _INDEX_ERRORS:
        return []


def _move_in(tmp, folder) -> None:
    """Move a complete save from ``tmp`` into ``folder``, over an earlier save, so that an interruption at any
    point leaves ``folder`` loading one save whole: the earlier one or the new one.

    The commit is the step that makes the new save's first-read file (its single weight file or its index,
    see ``_LOAD_ORDER``) the one transformers reads: it is moved in after the new shards, and an earlier
    file read before it (``model.safetensors`` under new shards) is deleted last. Earlier
    shards that a new shard of the same name replaces are first kept under hidden names that the earlier
    index is rewritten to point to. Earlier weight files this save did not write go once it is committed
    (they would be loaded instead of the new weights, or confuse a reader). ``config.json`` moves in just
    before the commit: an interruption between the two leaves the new config with the earlier weights, which
    ``from_pretrained`` refuses when their skip masks differ.
    """
    written = sorted(os.listdir(tmp))
    weights = [name for name in written if _WEIGHT_FILE.fullmatch(name)]
    commit = _read_first(weights)
    if commit is None:  # a save without weights (only a config): nothing to replace
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        return
    earlier = _weight_files(folder)
    first_read = _read_first(earlier)
    if first_read is not None and first_read.endswith(".json"):
        _keep_shards_read(folder, first_read, set(weights) - {commit})
    # the new shards (not read before their index), the other files, then the commit
    for name in [n for n in weights if n != commit] + [n for n in written if n not in weights] + [commit]:
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    # earlier files this save did not write; the one transformers read goes last: while it is there it is
    # read (the earlier save, whole), so deleting it is the commit when it is read before the new one
    stale = sorted(set(earlier) - set(written), key=lambda name: (name == first_read, name))
    for name in stale:
        os.remove(os.path.join(folder, name))
    for entry in os.scandir(folder):  # shards kept for an earlier index: none is read any more
        if _KEPT_SHARD.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.remove(entry.path)


def _keep_shards_read(folder, index_name: str, replaced: set[str]) -> None:
    """Point the index ``index_name`` in ``folder`` at hidden copies of its shards that a new save replaces
    (``replaced``), so it keeps loading its own weights until the new index is moved in over it.

    The copies are hard links where the file system has them (no data is written), full copies otherwise.
    """
    path = os.path.join(folder, index_name)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = dict(index["weight_map"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable index loads nothing already: nothing to keep
    shards = sorted(set(weight_map.values()) & replaced)
    if not shards:
        return
    tag = os.urandom(4).hex()
    kept = {}
    for shard in shards:
        target = f".replaced-{tag}-{shard}"
        try:
            os.link(os.path.join(folder, shard), os.path.join(folder, target))
        except FileNotFoundError:
            continue  # missing already: the index did not load before either
        except OSError:  # no hard links on this file system
            shutil.copyfile(os.path.join(folder, shard), os.path.join(folder, target))
        kept[shard] = target
    index["weight_map"] = {key: kept.get(shard, shard) for key, shard in weight_map.items()}
    rewritten = os.path.join(folder, f".replaced-{tag}-{index_name}")
    with open(rewritten, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(rewritten, path)


def _check_variant_shares_the_mask(folder, config, mask, variant: str) -> None:
    """A ``variant=`` save rewrites the ``config.json`` that the folder's other weights (the default ones, other
    variants) are loaded with: refuse one whose skip mask differs from theirs (they would no longer load)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(path):
        return
    own = re.compile(rf"(model|pytorch_model)\.{re.escape(variant)}(-\d+-of-\d+)?\.(safetensors|bin)"
                     rf"|(model\.safetensors|pytorch_model\.bin)\.index\.{re.escape(variant)}\.json")
    others = sorted(e.name for e in os.scandir(folder)
                    if e.is_file() and _ANY_WEIGHT_FILE.fullmatch(e.name) and not own.fullmatch(e.name))
    if not others:
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    mine = [config.skip_mask, (config.model_args or {}).get("skip_mask")]
    theirs = [saved.get("skip_mask"), (saved.get("model_args") or {}).get("skip_mask")]
    if theirs == [None, None] and mask is not None:
        # timm's own config.json names no mask: the default weights' skip flags are theirs (see from_pretrained)
        flags = _saved_skip_flags(folder)
        if flags is not None:
            mine = [mask, None]
            theirs = [[[flags.get(f"{blk}.attn_skipped", False) for blk in stage] for stage in _block_names(mask)], None]
    if json.loads(json.dumps(mine)) != theirs:
        raise ValueError(
            f"{folder} holds weights ({_some(others)}) whose skip mask {theirs[0]} differs from this "
            f"model's {mine[0]}; a variant= save shares their config.json and would make them unloadable. "
            "Save this model into its own folder (or ela_hf.export_pruned for a slim release)"
        )


def _saved_skip_flags(folder) -> dict[str, bool] | None:
    """``{"layer1.1.attn_skipped": True, ...}``: the skip flags stored with the default weights in ``folder``
    (safetensors or PyTorch files, single or sharded); None when there are none."""
    from safetensors import safe_open

    flags = {}
    for name in _files_read(folder):
        file = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".attn_skipped")}
        elif name.endswith(".bin"):
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        else:
            continue
        flags.update({_strip_prefix(k): bool(v) for k, v in tensors.items() if k.endswith(".attn_skipped")})
    return flags or None


def _block_names(mask) -> list[list[str]]:
    """timm's block names (``layer1.0``, ...) in the shape of ``mask``."""
    return [[f"layer{i + 1}.{j}" for j in range(len(stage))] for i, stage in enumerate(mask)]


def _weight_files(folder) -> list[str]:
    """The weight files (any layout transformers writes) in ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and _WEIGHT_FILE.fullmatch(e.name))


def _mask_into_config(network: nn.Module, config: ElaConfig | None) -> None:
    mask = network.skip_mask
    if config is not None and mask is not None:
        config.skip_mask = [list(stage) for stage in mask]


def _config_follows_loaded_mask(network: nn.Module, incompatible_keys) -> None:
    _mask_into_config(network, getattr(network, "_ela_config", None))


def _strip_prefix(key: str) -> str:
    return key[len(TIMM_PREFIX) + 1 :] if key.startswith(TIMM_PREFIX + ".") else key


def _is_head_key(key: str) -> bool:
    return _strip_prefix(key).startswith(CLASSIFIER_PREFIX)


def _raise_for_unreadable_weights(source, err: Exception, subfolder: str = "") -> None:
    """Name the weight file when a checkpoint's weights are missing or cannot be read; any other error
    (a size mismatch, a bad override) is left to propagate unchanged."""
    folder = os.path.join(source, subfolder) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(folder):
        if type(err).__name__ == "SafetensorError":  # a Hub (or cached) file that safetensors cannot parse
            raise ValueError(
                f"the weights of {source} are corrupt or truncated and cannot be read ({err}); a broken "
                "upload or download? Load again with force_download=True"
            ) from err
        return
    source = folder
    names = os.listdir(source)
    if not any(_ANY_WEIGHT_FILE.fullmatch(f) for f in names):
        if "config.json" in names:
            raise ValueError(f"{source} has a config.json but no weight file (model.safetensors)") from err
        return
    from safetensors import safe_open

    index = os.path.join(source, "model.safetensors.index.json")
    if os.path.isfile(index) and not os.path.isfile(os.path.join(source, "model.safetensors")):
        try:
            shards = _index_shards(index)
        except _INDEX_ERRORS as read_err:
            raise ValueError(f"{index} is corrupt and cannot be read: {read_err}") from err
        absent = [f for f in shards if not os.path.isfile(os.path.join(source, f))]
        if absent:
            raise ValueError(f"{source}: the weight index names shards that are missing: {absent}") from err
    # the single file, or every shard: the first one that does not parse is named
    for name in sorted(f for f in names if _ANY_WEIGHT_FILE.fullmatch(f) and f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(source, name), framework="pt") as f:
                f.keys()
        except Exception as read_err:  # noqa: BLE001 - any parse failure means the file is unusable
            raise ValueError(
                f"{os.path.join(source, name)} is corrupt or truncated and cannot be read: {read_err}"
            ) from err


class ElaModel(ElaPreTrainedModel):
    """The backbone without classifier: ``last_hidden_state`` (final feature map) and ``pooler_output`` ([B, C])."""

    def __init__(self, config: ElaConfig):
        super().__init__(config)
        self.timm_model = build_timm_network(config, num_classes=0)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images, normalised as the image processor does (`ElaImageProcessor`).
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
            Also return the stem output and every stage's output (timm's `forward_intermediates`); an index or a
            list of indices keeps only those (None in the other positions, as in transformers).
        """
        last_hidden_state, hidden_states = self._forward_features(pixel_values, output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pooled = self.timm_model.forward_head(last_hidden_state, pre_logits=True)
        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states
        )


class ElaForImageClassification(ElaPreTrainedModel):
    """Layer-attention ResNet with its linear classifier (timm's ``fc``); loss from ``labels``."""

    def __init__(self, config: ElaConfig):
        super().__init__(config)
        if not config.num_labels:
            raise ValueError(
                "ElaForImageClassification needs num_labels >= 1 (a classifier); use ElaModel for features"
            )
        self.num_labels = config.num_labels
        self.timm_model = build_timm_network(config, num_classes=config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images, normalised as the image processor does (`ElaImageProcessor`).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)`; cross-entropy (or MSE when `num_labels == 1`, BCE for
            `problem_type="multi_label_classification"`), as in transformers' other image classifiers.
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
            Also return the stem output and every stage's output; an index or a list of indices keeps only those
            (None in the other positions).
        """
        features, hidden_states = self._forward_features(pixel_values, output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits = self.timm_model.forward_head(features)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=hidden_states)


class ElaBackbone(BackboneMixin, ElaPreTrainedModel):
    """Feature maps of the stem and the stages (``config.out_features``) for detection / segmentation heads.

    ``AutoBackbone.from_config(ElaConfig(architecture="ela_resnet50", out_features=["stage2", "stage3", "stage4"]))``
    returns strides 8, 16, 32 with 512, 1024, 2048 channels (``backbone.channels``).
    """

    has_attentions = False

    def __init__(self, config: ElaConfig):
        super().__init__(config)
        self.timm_model = build_timm_network(config, num_classes=0)
        self.num_features = [info["num_chs"] for info in self.timm_model.feature_info]
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images, normalised as the image processor does.
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
            Also return every feature map (stem and all stages), not only the selected ones; an index or a list of
            indices keeps only those (None in the other positions).
        """
        if output_attentions:
            raise ValueError("ELA backbones have no attention maps to return (output_attentions)")
        pixel_values = self._check_pixel_values(pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        selected = _selected_hidden_states(output_hidden_states)
        if output_hidden_states or selected:  # (index 0, the stem, is an index here, not False)
            hidden_states = tuple(self.timm_model.forward_intermediates(pixel_values, intermediates_only=True))
            feature_maps = tuple(hidden_states[i] for i in self.out_indices)
            hidden_states = _keep_selected(hidden_states, selected)
        else:
            hidden_states = None
            # later stages are not run when no requested feature map needs them
            feature_maps = tuple(
                self.timm_model.forward_intermediates(
                    pixel_values, indices=list(self.out_indices), stop_early=True, intermediates_only=True
                )
            )
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)
