"""Layer-attention ResNets (MRLA-L, MRLA-B, ELA) built from timm's ResNet pieces and registered in timm.

Layout follows ``timm/models/resnet.py``: blocks, the stage, the model class, one ``_create_*`` helper
around ``build_model_with_cfg``, a ``default_cfgs`` table and one-line ``@register_model`` functions.

Weights keep timm's ResNet key names (``layer1.0.conv1.weight``); the attention layer of a block lives
under ``layerN.M.attn`` and its skip flag in the persistent buffer ``layerN.M.attn_skipped``. So a plain
timm ResNet checkpoint loads into an ELA model with only the attention keys missing.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.models.resnet import BasicBlock, Bottleneck, make_blocks

from ela_hf.layers import MrlaBase, MrlaLight, StageState

__all__ = [
    "LayerAttentionResNet",
    "LayerAttentionStage",
    "ElaBasicBlock",
    "ElaBottleneck",
    "SkipMask",
    "validate_skip_mask",
    "keep_kl_statistics_out_of_ddp",
]

SkipMask = List[List[bool]]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
ATTN_TYPES = ("mrla_l", "mrla_b")


def kl_buffer_names(module: nn.Module) -> List[str]:
    """The qualified names of the attention layers' KL accumulators among ``module``'s buffers."""
    return [name for name, _ in module.named_buffers() if name.rsplit(".", 1)[-1] in ("kl_sum", "kl_count")]


def keep_kl_statistics_out_of_ddp(module: nn.Module) -> None:
    """Name the attention layers' KL accumulators in ``module._ddp_params_and_buffers_to_ignore``.

    DDP copies rank 0's buffers to the other ranks at every synchronising forward pass; the accumulators
    hold each rank's own running sums (reduced explicitly at a window's end), which a step with several
    forward passes (R-Drop, consistency losses) would otherwise lose. Only the module that DDP wraps is
    read: the models call this on themselves, the pruning callback on the Trainer's model.
    """
    names = set(kl_buffer_names(module))
    if names:
        module._ddp_params_and_buffers_to_ignore = sorted(
            set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | names
        )


class _LayerAttentionBlockMixin:
    """Adds an optional attention layer after the residual add + ReLU of a timm ResNet block.

    ``attn`` is the attention module, or ``None`` when the model was built with this layer skipped
    (its parameters then do not exist). ``attn_skipped`` (persistent bool buffer) is the block's entry
    of the skip mask; ``_skip`` mirrors it as a Python bool so that the forward pass never reads a
    device tensor (no host sync) and ``torch.compile`` guards on it (a mask change recompiles once).
    """

    attn: Optional[nn.Module]
    attn_type: Optional[str]

    def _init_layer_attention(
        self, attn_type: Optional[str], dim_per_head: int, drop_path: float, skipped: bool, dilation: int = 1
    ) -> None:
        self.attn_type = attn_type
        self._skip = bool(skipped) if attn_type else True
        if attn_type is None:
            self.attn = None
            return
        channels = self._out_channels()
        if skipped:
            self.attn = None
        elif attn_type == "mrla_l":
            self.attn = MrlaLight(channels, dim_per_head=dim_per_head, drop_path=drop_path, dilation=dilation)
        else:
            self.attn = MrlaBase(channels, dim_per_head=dim_per_head, drop_path=drop_path, dilation=dilation)
        self.register_buffer("attn_skipped", torch.tensor(bool(skipped)), persistent=True)

    def _out_channels(self) -> int:
        raise NotImplementedError

    def _conv_path(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _final_act_module(self) -> nn.Module:
        raise NotImplementedError

    def _final_act(self, x: torch.Tensor) -> torch.Tensor:
        return self._final_act_module()(x)

    @property
    def is_skipped(self) -> bool:
        return self._skip

    def skip_attention(self) -> None:
        """Skip this block's attention layer in place (parameters stay; no kernel of it runs)."""
        self._skip = True
        self.attn_skipped.fill_(True)

    def _follow_skip_buffer(self) -> bool:
        """Set ``_skip`` from the ``attn_skipped`` buffer (a host read); True when it changed.

        A skip flag copied in place into the buffer (timm's ModelEma, AveragedModel(use_buffers=True), a user's
        copy_) bypasses skip_attention and the load hook. A layer built without its weights stays skipped."""
        if self.attn_type is None or self.attn_skipped.is_meta:
            return False
        skipped = bool(self.attn_skipped)
        if skipped == self._skip or not (skipped or self.attn is not None):
            return False
        self._skip = skipped
        return True

    def train(self, mode: bool = True):
        # _skip follows the buffer whenever the mode changes and at every eval() (validation), and in the
        # helpers that read or write the mask (ela_hf.get_skip_mask, slim_state_dict, export_pruned), never in
        # the per-step train() calls of a training loop, where reading the buffer would be a host sync
        if not mode or mode != self.training:
            self._follow_skip_buffer()
        return super().train(mode)

    def forward(self, x: torch.Tensor, state: Optional[StageState] = None) -> torch.Tensor:
        sc = x if self.downsample is None else self.downsample(x)
        y = self._conv_path(x)
        if self.drop_path is not None:
            y = self.drop_path(y)
        if self._skip:
            return self._final_act(y + sc)
        if state is None:
            if self.attn_type == "mrla_b" and getattr(self, "_position_in_stage", 0) > 0:
                warnings.warn(
                    f"an MRLA-B block (block {self._position_in_stage} of its stage) ran on its own, outside its "
                    "LayerAttentionStage: it attends to no earlier layer of the stage, so its output differs from "
                    "the network's; run the whole stage (model.layer2(x), not its blocks one by one or "
                    "nn.Sequential(*model.layer2))", stacklevel=2,
                )
            state = StageState()
        # the residual sum and the final activation go in with the layer: its CPU kernels apply a ReLU
        # themselves (MrlaLight.forward, MrlaBase.forward)
        if self.attn_type == "mrla_l":
            return self.attn(y, sc, state, pre_act=self._final_act_module())
        return self.attn(y, state, sc=sc, pre_act=self._final_act_module())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "attn_skipped"
        if self.attn_type is None or key not in state_dict:
            return
        flag = state_dict[key]
        if isinstance(flag, torch.Tensor) and not flag.is_meta and (flag.numel() != 1 or flag.item() not in (0, 1)):
            # a bool buffer takes 0.3 (or any nonzero value) as True: a corrupted flag would silently skip a layer
            error_msgs.append(f"{key}: a skip flag must be a single boolean, got {flag!r}")
            return
        skipped = bool(flag)
        if not skipped and self.attn is None:
            error_msgs.append(
                f"{prefix.rstrip('.')}: the checkpoint marks this attention layer active, but the model was "
                "built with it skipped (its weights do not exist); build the model with the checkpoint's skip_mask"
            )
            return
        self._skip = skipped


class ElaBasicBlock(_LayerAttentionBlockMixin, BasicBlock):
    """timm's BasicBlock (ResNet-18/34) with an optional layer-attention layer after its output."""

    def _out_channels(self) -> int:
        return self.conv2.out_channels

    def _final_act_module(self) -> nn.Module:
        return self.act2

    def _conv_path(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.aa(x)
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        return x


class ElaBottleneck(_LayerAttentionBlockMixin, Bottleneck):
    """timm's Bottleneck (ResNet-50/101/152 and the CIFAR nets) with an optional layer-attention layer."""

    def _out_channels(self) -> int:
        return self.conv3.out_channels

    def _final_act_module(self) -> nn.Module:
        return self.act3

    def _conv_path(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.aa(x)
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        return x


_BLOCKS = {"basic": ElaBasicBlock, "bottleneck": ElaBottleneck}


class LayerAttentionStage(nn.Module):
    """A ResNet stage whose blocks share one :class:`StageState` per forward pass.

    Deliberately not an ``nn.Sequential``: timm's feature extractors flatten Sequential stages and
    would call the blocks one by one, silently cutting the MRLA-B cache. Children are named ``0, 1, ...``
    so weight keys stay timm's (``layer1.0.conv1.weight``).
    """

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        for i, blk in enumerate(blocks):
            self.add_module(str(i), blk)
            blk._position_in_stage = i  # (a later block run on its own attends to no earlier layer: it warns)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, idx: int) -> nn.Module:
        return list(self._modules.values())[idx]

    @property
    def has_attention(self) -> bool:
        return any(blk.attn_type is not None for blk in self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "0.attn_skipped"
        flag = state_dict.get(key)
        if isinstance(flag, torch.Tensor) and not flag.is_meta and flag.numel() == 1 and bool(flag):
            # the stage's first layer starts its MRLA state and has no predecessor to be redundant with
            error_msgs.append(f"{key}: the checkpoint skips the first block of a stage, which can never be skipped")

    @property
    def skip_mask(self) -> List[bool]:
        return [blk.is_skipped for blk in self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # capacity lets MRLA-B preallocate the stage's value buffer once (no per-block growth)
        state = StageState(capacity=sum(1 for blk in self if not blk.is_skipped))
        for blk in self:
            x = blk(x, state)
        state.close()
        return x


def validate_skip_mask(mask: Any, stage_sizes: Sequence[int]) -> SkipMask:
    """Check that ``mask`` fits stages of ``stage_sizes`` blocks; return it as a list of bool lists.

    Raises ``ValueError`` naming the problem: wrong number of stages, wrong stage length, non-bool
    entries, or a skipped first block (a stage's first layer has no predecessor to be redundant with).
    """
    expected = [int(n) for n in stage_sizes]
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        mask = mask.tolist()
    if not isinstance(mask, (list, tuple)):
        raise ValueError(
            f"skip_mask must be a list of per-stage lists of bools (stage sizes {expected}), got {type(mask).__name__}"
        )
    mask = [s.tolist() if isinstance(s, (torch.Tensor, np.ndarray)) else s for s in mask]
    for i, stage in enumerate(mask):
        if not isinstance(stage, (list, tuple)):
            raise ValueError(
                f"skip_mask must be a list of per-stage lists of bools (stage sizes {expected}), "
                f"but its stage {i} is a {type(stage).__name__}: {stage!r}"
            )
    if len(mask) != len(expected):
        raise ValueError(f"skip_mask has {len(mask)} stages but the architecture has {len(expected)} (stage sizes {expected})")
    out: SkipMask = []
    for i, (stage, n) in enumerate(zip(mask, expected)):
        if len(stage) != n:
            raise ValueError(f"skip_mask stage {i} has {len(stage)} entries but the stage has {n} blocks (stage sizes {expected})")
        for j, v in enumerate(stage):
            if isinstance(v, np.generic) and v.dtype.kind in "bui":
                v = v.item()
            if not isinstance(v, (bool, int)) or isinstance(v, int) and v not in (0, 1):
                raise ValueError(f"skip_mask[{i}][{j}] must be a bool, got {v!r}")
        if stage and bool(stage[0]):
            raise ValueError(f"skip_mask[{i}][0] skips the first block of stage {i}, which can never be skipped")
        out.append([bool(v) for v in stage])
    return out


class LayerAttentionResNet(nn.Module):
    """ResNet with layer attention (MRLA-L or MRLA-B) in every block, and a skip mask (ELA).

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50 or ``(12, 12, 12)`` for CIFAR ResNet-110.
        block: ``'basic'`` or ``'bottleneck'``.
        attn_type: ``'mrla_b'``, ``'mrla_l'`` or ``None`` (the plain ResNet).
        channels: planes per stage (``(64, 128, 256, 512)``; the CIFAR nets use ``(16, 32, 64)``).
        stem_type: ``''`` (7x7 conv + max-pool), ``'deep'`` (three 3x3 convs + max-pool, the ``d`` variants)
            or ``'cifar'`` (one 3x3 conv, stride 1, no pooling).
        stem_width: stem channels (``deep`` stem: width of its first two convs; output is twice that).
        dim_per_head: channels per attention head (default 32 for MRLA-L, 16 for MRLA-B).
        skip_mask: per-stage lists of bools; skipped attention layers are not built.
        drop_path_rate: stochastic depth on the attention branch (linear over blocks); the conv path has none.
        drop_block_rate: DropBlock on the conv path of stages 3 and 4 (timm's ResNet rule).
        output_stride: 32 (default), 16 or 8: the later stages keep their resolution and dilate their
            convolutions instead (segmentation and DC5 detection backbones). ImageNet stems only.
        avg_down: average-pool downsample in the shortcut (the ``d`` variants).
        device, dtype: timm's factory arguments: the model is built on ``device`` (``'meta'`` defers the
            allocation; then ``to_empty`` and ``reinit_non_persistent_buffers`` from ``timm.models._manipulate``)
            and cast to the floating-point ``dtype``; the KL statistics stay float32.
    """

    def __init__(
        self,
        layers: Sequence[int],
        block: str = "bottleneck",
        attn_type: Optional[str] = "mrla_b",
        channels: Sequence[int] = (64, 128, 256, 512),
        stem_type: str = "",
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        output_stride: int = 32,
        dim_per_head: Optional[int] = None,
        skip_mask: Optional[SkipMask] = None,
        avg_down: bool = False,
        zero_init_last: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (timm's factory argument), got {dtype!r}")
        # timm's factory arguments: built on `device` ('meta' for deferred initialisation), then cast to
        # `dtype` (the KL statistics stay float32, see MrlaLight/MrlaBase._apply)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            if block not in _BLOCKS:
                raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
            if attn_type is not None and attn_type not in ATTN_TYPES:
                raise ValueError(f"attn_type must be one of {ATTN_TYPES} or None, got {attn_type!r}")
            if stem_type not in ("", "deep", "cifar"):
                raise ValueError(f"stem_type must be '', 'deep' or 'cifar', got {stem_type!r}")
            if len(layers) != len(channels):
                raise ValueError(f"layers {tuple(layers)} and channels {tuple(channels)} must have one entry per stage")
            if isinstance(in_chans, bool) or not isinstance(in_chans, numbers.Integral):
                raise TypeError(f"in_chans must be an int (input image channels), got {in_chans!r} ({type(in_chans).__name__})")
            if in_chans < 1:
                raise ValueError(f"in_chans must be a positive number of input image channels, got {in_chans}")
            in_chans = int(in_chans)
            if output_stride not in (8, 16, 32):
                raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
            if stem_type == "cifar" and output_stride != 32:
                raise ValueError(
                    f"output_stride={output_stride} is for the ImageNet stems; the CIFAR stem keeps full resolution "
                    "and the CIFAR nets' last stage already runs at stride 4"
                )
            for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate),
                               ("drop_block_rate", drop_block_rate)):
                if not isinstance(rate, numbers.Real):
                    raise TypeError(f"{name} must be a number in [0, 1), got {rate!r} ({type(rate).__name__})")
                if not 0.0 <= rate < 1.0:
                    raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
            if attn_type is None and drop_path_rate > 0:
                warnings.warn(
                    f"drop_path_rate={drop_path_rate} has no effect on a plain ResNet (attn_type=None): ELA's drop path "
                    "acts on the attention branch only", UserWarning, stacklevel=2,
                )
            self.num_classes = num_classes
            self.in_chans = in_chans
            self.drop_rate = drop_rate
            self.attn_type = attn_type
            self.grad_checkpointing = False
            if dim_per_head is None:
                dim_per_head = 32 if attn_type == "mrla_l" else 16
            self.dim_per_head = dim_per_head
            if skip_mask is not None:
                if attn_type is None:
                    raise ValueError("skip_mask was given but this model has no attention layers (attn_type=None)")
                skip_mask = validate_skip_mask(skip_mask, layers)
            else:
                skip_mask = [[False] * n for n in layers]

            # Stem: timm's layouts (plain 7x7, 'deep' = ResNet-D) and the CIFAR 3x3 stem.
            if stem_type == "deep":
                inplanes = stem_width * 2
                self.conv1 = nn.Sequential(
                    nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(stem_width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
                    nn.BatchNorm2d(stem_width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(stem_width, inplanes, 3, stride=1, padding=1, bias=False),
                )
            elif stem_type == "cifar":
                inplanes = stem_width
                self.conv1 = nn.Conv2d(in_chans, inplanes, 3, stride=1, padding=1, bias=False)
            else:
                inplanes = stem_width
                self.conv1 = nn.Conv2d(in_chans, inplanes, 7, stride=2, padding=3, bias=False)
            # timm's features_only backbones call the stem's modules directly, not forward_stem: the input check
            # runs on the first conv too
            self.conv1.register_forward_pre_hook(_check_stem_input)
            self.bn1 = nn.BatchNorm2d(inplanes)
            self.act1 = nn.ReLU(inplace=True)
            stem_reduction = 1 if stem_type == "cifar" else 2
            self.maxpool = nn.Identity() if stem_type == "cifar" else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.feature_info = [dict(num_chs=inplanes, reduction=stem_reduction, module="act1")]

            block_cls = _BLOCKS[block]
            stage_modules, stage_feature_info = make_blocks(
                tuple([block_cls] * len(layers)),
                tuple(channels),
                tuple(layers),
                inplanes,
                output_stride=output_stride,
                avg_down=avg_down,
                drop_block_rate=drop_block_rate,
                act_layer=nn.ReLU,
                norm_layer=nn.BatchNorm2d,
            )
            # make_blocks assumes a stride-4 stem; the CIFAR stem has stride 1.
            reduction_fix = 4 if stem_type == "cifar" else 1
            total = sum(layers)
            net_idx = 0
            self.stage_names: List[str] = []
            for idx, ((name, seq), info, stage_mask) in enumerate(zip(stage_modules, stage_feature_info, skip_mask)):
                blocks = list(seq)
                # a stage that output_stride keeps at a finer resolution dilates its convs by what its stride
                # would have reduced (make_blocks counts from a stride-4 stem: stage i is at 4 * 2**i at stride 32)
                dilation = (4 * 2**idx) // info["reduction"]
                for blk, skipped in zip(blocks, stage_mask):
                    dpr = drop_path_rate * net_idx / max(total - 1, 1)
                    blk._init_layer_attention(attn_type, dim_per_head, dpr, skipped, dilation)
                    net_idx += 1
                self.add_module(name, LayerAttentionStage(blocks))
                self.stage_names.append(name)
                self.feature_info.append(dict(info, reduction=info["reduction"] // reduction_fix))

            self.num_features = channels[-1] * block_cls.expansion
            self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()  # 'catavgmax' doubles it
            self.init_weights(zero_init_last=zero_init_last)
            keep_kl_statistics_out_of_ddp(self)
        if dtype is not None:
            self.to(dtype=dtype)

    # ----------------------------------------------------------------------------------------------
    # timm model interface
    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True, needs_reset: bool = False) -> None:
        """The construction's initialisation. ``needs_reset=True`` (timm's convention for a model built on the
        meta device and then ``to_empty``, whose memory holds anything) first resets every module that can
        (``reset_parameters``: BatchNorm running statistics too, MRLA-L's ``lam``), zeroes the KL statistics
        and sets every skip flag back to the mask the network was built with (a layer built skipped stays
        skipped, every other one is active): a fresh model instead of leftover memory."""
        if needs_reset:
            for m in self.modules():
                if m is not self and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                if isinstance(m, _LayerAttentionBlockMixin) and m.attn_type is not None:
                    with torch.no_grad():
                        m.attn_skipped.fill_(m.attn is None)
                    m._skip = m.attn is None
            reinit_non_persistent_buffers(self)  # timm's: the KL statistics start from zero
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Checkpointing is per stage: the MRLA-B cache lives inside a stage, so blocks cannot be split.
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        like = next(self.parameters(), None)
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
        if like is not None:  # on the model's device and in its dtype, and in its train/eval mode
            self.fc.to(device=like.device, dtype=like.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @property
    def stages(self) -> List[LayerAttentionStage]:
        return [getattr(self, n) for n in self.stage_names]

    def _check_input(self, x: torch.Tensor) -> None:
        _check_images(x, self.in_chans)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            # backward's recompute records no KL: the attention layers never record inside a backward pass,
            # and leaves the BatchNorm running statistics as the forward left them (it would update them a
            # second time with the same batch). Under torch.compile, checkpoint takes no context_fn of ours.
            if torch.compiler.is_compiling():
                return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            return torch.utils.checkpoint.checkpoint(
                stage, x, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _KeepBatchNormStatistics(stage)),
            )
        return stage(x)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for name in self.stage_names:
            x = self._run_stage(getattr(self, name), x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Features after the stem and after each stage (timm's ``forward_intermediates`` contract)."""
        if output_fmt != "NCHW":
            raise ValueError("output_fmt must be 'NCHW'")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        names = self.stage_names[:max_index] if stop_early else self.stage_names
        for i, name in enumerate(names, start=1):
            x = self._run_stage(getattr(self, name), x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last feature in ``indices`` (and the head); returns the kept indices.

        timm calls this for ``features_only=True, feature_cls='getter'`` backbones. Dropped stages are
        removed with their weights, so the skip mask and the KL statistics then cover the kept stages only.
        """
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        prune_end = max_index < len(self.stage_names)
        for name in self.stage_names[max_index:]:
            delattr(self, name)
        self.stage_names = self.stage_names[:max_index]
        if max_index == 0:
            self.maxpool = nn.Identity()
        if prune_end:
            # features now end at the last kept stage; the head was sized for the final features
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------------------------------------
    # skip mask and KL recording: thin wrappers over ela_hf.models.attention_tools, which also work on
    # any module that contains these stages (a transformers wrapper, a user's module)
    @property
    def stage_sizes(self) -> List[int]:
        return [len(s) for s in self.stages]

    @property
    def skip_mask(self) -> Optional[SkipMask]:
        """One list of bools per stage (True = attention layer skipped); None for a plain ResNet."""
        if self.attn_type is None:
            return None
        return [s.skip_mask for s in self.stages]

    def set_skip_mask(self, mask: SkipMask) -> None:
        from .attention_tools import set_skip_mask

        set_skip_mask(self, mask)

    def kl_recording(self, enabled: bool = True):
        from .attention_tools import kl_recording

        return kl_recording(self, enabled)

    def set_kl_recording(self, enabled: bool) -> None:
        from .attention_tools import set_kl_recording

        set_kl_recording(self, enabled)

    def reset_kl_statistics(self) -> None:
        from .attention_tools import reset_kl_statistics

        reset_kl_statistics(self)

    def kl_statistics(self) -> Dict[Tuple[int, int], float]:
        from .attention_tools import kl_statistics

        return kl_statistics(self)


# --------------------------------------------------------------------------------------------------
# creation, pretrained cfgs, registration


class _KeepBatchNormStatistics:
    """Context of an activation-checkpoint recompute: the BatchNorm running statistics (and step counters)
    of ``module`` are put back as they were when it began, so each batch updates them once."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "_KeepBatchNormStatistics":
        with torch.no_grad():
            self.saved = [
                (buf, buf.clone())
                for m in self.module.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                if buf is not None
            ]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def _check_images(x: torch.Tensor, in_chans: int) -> None:
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            "torch.fx symbolic tracing cannot trace the ela_hf models (their input check and attention layers "
            "branch on tensor shapes, dtypes and devices); capture them with torch.compile, torch.export or "
            "torch.jit.trace, and take feature maps with features_only=True (the default feature_cls, or "
            "feature_cls='getter'), not feature_cls='fx'"
        )
    if x.ndim != 4:
        raise ValueError(f"expected images of shape [batch, {in_chans}, height, width], got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
            "images must be channels-first [batch, channels, height, width]"
        )
    if not torch.is_floating_point(x):
        # PyTorch's own error ("expected scalar type Byte but found Float") does not say what to do
        raise ValueError(
            f"expected floating-point images (normalised with the model's mean and std), got {x.dtype}; "
            "convert raw pixels first, e.g. with timm.data.create_transform(**timm.data.resolve_data_config("
            "model=model))"
        )


def _check_stem_input(stem: nn.Module, args) -> None:
    if args and isinstance(args[0], torch.Tensor) and not torch.jit.is_scripting():
        first = stem[0] if isinstance(stem, nn.Sequential) else stem
        _check_images(args[0], first.in_channels)


def _create_ela_resnet(variant: str, pretrained: bool = False, **kwargs) -> LayerAttentionResNet:
    if pretrained:
        from timm.models._builder import resolve_pretrained_cfg

        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or getattr(cfg, "state_dict", None) is not None):
            # timm would log a warning and return random weights
            raise ValueError(
                f"no pretrained weights are published for {variant!r}; load a checkpoint instead: "
                f"timm.create_model('hf-hub:<org>/<repo>', pretrained=True), "
                f"timm.create_model('local-dir:<folder>', pretrained=True), or "
                f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file='<weights>')) "
                "(with checkpoint_path= / timm's --initial-checkpoint, leave pretrained=False: the checkpoint is "
                "loaded after creation)"
            )
    if pretrained and kwargs.get("pretrained_strict", True):
        # timm loads non-strictly whenever the head is not the checkpoint's (features_only, another num_classes)
        # and only logs missing keys at INFO level: refuse weights that would leave parts of the body random
        # (after a filter of the user's own: what it drops stays random too)
        kwargs["pretrained_filter_fn"] = functools.partial(
            _check_pretrained_complete, variant, features_only=bool(kwargs.get("features_only")),
            user_filter=kwargs.get("pretrained_filter_fn"),
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):  # timm would fail with a bare AssertionError
        cfg = kwargs.get(key)
        if isinstance(cfg, dict) and cfg.get("input_size") is not None:
            check_input_size(cfg["input_size"])
    # the CIFAR nets have three stages: default features are the stem plus every stage
    out_indices = tuple(range(len(kwargs["layers"]) + 1))
    if kwargs.get("features_only") and "out_indices" in kwargs:
        _check_out_indices(kwargs["out_indices"], len(out_indices))
    model = build_model_with_cfg(
        LayerAttentionResNet, variant, pretrained, feature_cfg=dict(out_indices=out_indices), **kwargs
    )
    if not isinstance(model, LayerAttentionResNet):
        # a features_only wrapper (any feature_cls) under its own buffer names: DDP reads the wrapped module
        keep_kl_statistics_out_of_ddp(model)
    return model


def check_input_size(input_size: Any) -> None:
    """Raise ``ValueError`` unless ``input_size`` (a timm data config's) is ``(channels, height, width)``."""
    if (
        not isinstance(input_size, (list, tuple))
        or len(input_size) != 3
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in input_size)
    ):
        raise ValueError(
            f"pretrained_cfg['input_size'] must be [channels, height, width] (three positive ints, e.g. [3, 224, 224]), "
            f"got {input_size!r}"
        )


def _run_user_filter(user_filter: Callable, state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """A user's ``pretrained_filter_fn``, with two arguments or one as timm calls it. timm tells the two apart by
    catching a TypeError; here the signature does, so that a TypeError raised inside the filter reaches the user
    as that filter's (timm's own fallback, around this check, would report this function's arguments instead)."""
    try:
        params = inspect.signature(user_filter).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):  # no signature to read (some builtins): timm's way
        two = None
    name = getattr(user_filter, "__qualname__", None) or repr(user_filter)
    try:
        if two is None:
            try:
                return user_filter(state_dict, model)
            except TypeError:
                return user_filter(state_dict)
        return user_filter(state_dict, model) if two else user_filter(state_dict)
    except TypeError as err:
        raise RuntimeError(f"the pretrained_filter_fn {name} raised TypeError: {err}") from err


def _check_pretrained_complete(
    variant: str, state_dict: Dict[str, Any], model: nn.Module, features_only: bool = False,
    user_filter: Optional[Callable] = None,
) -> Dict[str, Any]:
    """timm's ``pretrained_filter_fn``: the pretrained weights must hold every parameter and buffer of the model
    below its classifier (BatchNorm step counters aside), or the load is refused naming what is missing.

    Also warns where timm is about to drop a classifier that fits: timm keeps the checkpoint's head only when
    the model's ``num_classes`` equals the pretrained config's, which for a weights file given by
    ``pretrained_cfg_overlay=dict(file=...)`` is the architecture's default, not the file's.

    A ``pretrained_filter_fn`` of the user's (``user_filter``) runs first, as timm would call it."""
    if user_filter is not None:
        state_dict = _run_user_filter(user_filter, state_dict, model)
    classifier = model.pretrained_cfg.get("classifier") or "fc"
    head = f"{classifier}."
    ours, cfg_classes = model.state_dict().get(f"{head}weight"), model.pretrained_cfg.get("num_classes")
    theirs = state_dict.get(f"{head}weight")
    if (
        not features_only and ours is not None and theirs is not None and tuple(theirs.shape) == tuple(ours.shape)
        and cfg_classes is not None and getattr(model, "num_classes", None) != cfg_classes
    ):
        warnings.warn(
            f"the pretrained weights' classifier {classifier!r} fits this {variant!r} with num_classes="
            f"{model.num_classes}, but timm discards it because the pretrained config says num_classes={cfg_classes}: "
            f"the head starts from random weights. To keep it, add num_classes={model.num_classes} to "
            "pretrained_cfg_overlay (with file=...), or load the exported folder with "
            "timm.create_model('local-dir:<folder>', pretrained=True)",
            stacklevel=2,
        )
    model_keys = list(model.state_dict())
    missing = [
        k for k in model_keys
        if k not in state_dict and not k.startswith(head) and not k.endswith("num_batches_tracked")
    ]
    other_type, extra = _unexpected_weights(model_keys, list(state_dict), head)
    opt_out = "; pretrained_strict=False accepts it (timm then loads what fits and ignores the rest)"
    hint = _other_attention_type_hint(model_keys, list(state_dict), missing, other_type, variant)
    if hint is not None:
        raise ValueError(f"the pretrained weights for {variant!r} do not fit its attention layers: {hint}{opt_out}")
    if missing:
        attention_only = all(".attn." in k or k.endswith("attn_skipped") for k in missing)
        raise ValueError(
            f"the pretrained weights for {variant!r} miss {len(missing)} of the model's parameters and buffers "
            f"({_some(missing, 4)}), which would stay randomly initialised (timm loads features_only backbones and "
            "new heads non-strictly). "
            + ("Only attention layers are missing: a slim checkpoint loads with its skip mask "
               "(timm.create_model('local-dir:<export>', ...), or skip_mask=...), and ela_hf.init_from_resnet "
               "starts from a plain ResNet's weights"
               if attention_only else "Give a checkpoint of this architecture")
            + "; pretrained_strict=False accepts the random initialisation"
        )
    if extra:
        raise ValueError(
            f"the pretrained weights for {variant!r} hold {len(extra)} parameters and buffers this model does not have "
            f"({_some(extra, 4)}): weights of a deeper network or of another architecture, which timm would drop "
            f"without a word when it loads non-strictly (features_only backbones, new heads); give a checkpoint of "
            f"this architecture{opt_out}"
        )
    return state_dict


def _unexpected_weights(model_keys: Sequence[str], file_keys: Sequence[str], head: str) -> Tuple[List[str], List[str]]:
    """Keys of a weights file that a network does not have, below its classifier ``head`` (a key prefix) and
    BatchNorm step counters aside: ``(other_type, extra)``. ``other_type``: attention weights of layers the
    network has with other keys (MRLA-L's ``lam`` under an MRLA-B network); ``extra``: everything else (blocks of
    a deeper network, another architecture's modules). Attention weights of a layer the network was built without
    (a slim model given a full checkpoint) are neither: they are simply not needed."""
    model_keys = set(model_keys)
    layers_with_weights = {k.split(".attn.")[0] for k in model_keys if ".attn." in k}
    layers = {k[: -len(".attn_skipped")] for k in model_keys if k.endswith(".attn_skipped")}
    other_type, extra = [], []
    for k in file_keys:
        if k in model_keys or k.startswith(head) or k.endswith("num_batches_tracked"):
            continue
        if ".attn." in k:
            layer = k.split(".attn.")[0]
            if layer in layers_with_weights:
                other_type.append(k)
                continue
            if layer in layers:
                continue
        extra.append(k)
    return other_type, extra


def _other_attention_type_hint(model_keys: Sequence[str], file_keys: Sequence[str], missing: Sequence[str],
                              other_type: Sequence[str], architecture: str) -> Optional[str]:
    """The error text for a file of another attention type (MRLA-B weights under an MRLA-L architecture, or the
    other way round), or None: the file has some of a layer's attention weights, and misses or adds others."""
    file_keys = set(file_keys)
    loaded_layers = {k.split(".attn.")[0] for k in model_keys if ".attn." in k and k in file_keys}
    partial = [k for k in missing if ".attn." in k and k.split(".attn.")[0] in loaded_layers]
    examples = list(partial[:2]) + list(other_type[:2])
    if not examples:
        return None
    return (
        f"the file has weights for these attention layers but not the same ones (e.g. {', '.join(examples[:2])} "
        f"{'missing' if partial else 'not in the model'}): weights of another attention type (MRLA-B against "
        f"MRLA-L) than {architecture!r}; load them with the checkpoint's architecture"
    )


def _some(names: List[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many more there are (for error messages)."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_out_indices(out_indices: Any, num_features: int) -> None:
    """timm's ``out_indices`` of a features_only model: an int n (the last n feature maps), or indices into the
    ``num_features`` maps (0 = the stem, then the stages; negative ones count from the end).

    An empty selection gave a backbone that returns no feature map (or, with ``feature_cls='getter'``, failed in
    timm with "max() arg is an empty sequence"); an index past the end failed with a bare IndexError.
    """
    maps = f"the model has {num_features} feature maps (0 = the stem, 1..{num_features - 1} = the stages)"
    if isinstance(out_indices, numbers.Integral) and not isinstance(out_indices, bool):
        if not 1 <= out_indices <= num_features:
            raise ValueError(f"out_indices={out_indices} (the last n feature maps) must be in 1..{num_features}: {maps}")
        return
    indices = None
    if not isinstance(out_indices, (str, bytes)):
        try:
            indices = list(out_indices)
        except TypeError:
            pass
    if indices is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices):
        raise TypeError(f"out_indices must be an int or a list of ints, got {out_indices!r}; {maps}")
    if not indices:
        raise ValueError(f"out_indices is empty: name at least one feature map; {maps}")
    outside = [i for i in indices if not -num_features <= i < num_features]
    if outside:
        raise ValueError(f"out_indices {indices} has indices {outside} out of range: {maps}")
    resolved = [i % num_features for i in indices]
    if any(a >= b for a, b in zip(resolved, resolved[1:])):
        # timm returns the maps in network order, once each, but lists feature_info in the order given: an FPN
        # built from feature_info.channels() would be wired to the wrong maps
        raise ValueError(
            f"out_indices {indices} (maps {resolved}) must name each feature map once, in network order: the "
            f"backbone returns them in that order, and feature_info would list them as given; {maps}"
        )


def _cfg(variant: str, **kwargs) -> Dict[str, Any]:
    # no download source: no weights are published (pretrained=True without a checkpoint is an error)
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


def _cifar_cfg(variant: str, **kwargs) -> Dict[str, Any]:
    return _cfg(
        variant,
        num_classes=100,
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        crop_pct=1.0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        **kwargs,
    )


# name -> constructor arguments. One table drives the default cfgs and the registered functions.
_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_CIFAR_DEPTHS = {20: 2, 56: 6, 110: 12}
_DEEP_STEM = dict(stem_type="deep", stem_width=32, avg_down=True)


def _imagenet_args(depth: int, attn_type: Optional[str], deep: bool = False) -> Dict[str, Any]:
    block, layers = _IMAGENET_DEPTHS[depth]
    args = dict(block=block, layers=layers, attn_type=attn_type)
    if deep:
        args.update(_DEEP_STEM)
    return args


def _cifar_args(depth: int, attn_type: Optional[str]) -> Dict[str, Any]:
    n = _CIFAR_DEPTHS[depth]
    # 32 channels per head: with 16 the CIFAR nets' first stage (64 channels) would still work, but the
    # paper's CIFAR code uses 32 for both attention kinds.
    return dict(
        block="bottleneck", layers=(n, n, n), channels=(16, 32, 64), stem_type="cifar", stem_width=16,
        attn_type=attn_type, dim_per_head=32,
    )


MODEL_ARGS: Dict[str, Dict[str, Any]] = {}
for _d in (18, 34, 50, 101, 152):
    MODEL_ARGS[f"ela_resnet{_d}"] = _imagenet_args(_d, "mrla_b")
for _d in (50, 101):
    MODEL_ARGS[f"ela_l_resnet{_d}"] = _imagenet_args(_d, "mrla_l")
for _d in (50, 101, 152):
    MODEL_ARGS[f"mrla_l_resnet{_d}"] = _imagenet_args(_d, "mrla_l")
    MODEL_ARGS[f"mrla_b_resnet{_d}"] = _imagenet_args(_d, "mrla_b")
MODEL_ARGS["ela_resnet50d"] = _imagenet_args(50, "mrla_b", deep=True)
MODEL_ARGS["ela_resnet101d"] = _imagenet_args(101, "mrla_b", deep=True)
MODEL_ARGS["mrla_b_resnet50d"] = _imagenet_args(50, "mrla_b", deep=True)
for _d in (20, 56, 110):
    MODEL_ARGS[f"ela_resnet{_d}_cifar"] = _cifar_args(_d, "mrla_b")
    MODEL_ARGS[f"ela_l_resnet{_d}_cifar"] = _cifar_args(_d, "mrla_l")
    MODEL_ARGS[f"mrla_l_resnet{_d}_cifar"] = _cifar_args(_d, "mrla_l")
    MODEL_ARGS[f"mrla_b_resnet{_d}_cifar"] = _cifar_args(_d, "mrla_b")
    MODEL_ARGS[f"resnet{_d}_cifar"] = _cifar_args(_d, None)

def _default_cfg(name: str) -> Dict[str, Any]:
    if name.endswith("_cifar"):
        return _cifar_cfg(name)
    # the deep stem's first conv is conv1.0 (timm adapts its weights to another in_chans by this name)
    return _cfg(name, first_conv="conv1.0") if MODEL_ARGS[name].get("stem_type") == "deep" else _cfg(name)


default_cfgs = generate_default_cfgs({name: _default_cfg(name) for name in MODEL_ARGS})


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> LayerAttentionResNet:
        return _create_ela_resnet(name, pretrained, **dict(MODEL_ARGS[name], **kwargs))

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    args = MODEL_ARGS[name]
    kind = {"mrla_b": "MRLA-B", "mrla_l": "MRLA-L", None: "plain"}[args["attn_type"]]
    entrypoint.__doc__ = f"{name}: {kind} ResNet, {args['block']} blocks {tuple(args['layers'])}."
    return entrypoint


# timm's registry keys on the function's name and module; one generated function per table row keeps
# the table the single source of truth (the functions are still plain ``@register_model`` entrypoints).
for _name in MODEL_ARGS:
    globals()[_name] = register_model(_make_entrypoint(_name))
