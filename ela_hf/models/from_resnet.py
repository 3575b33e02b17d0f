"""Start an ELA model from a plain ResNet checkpoint: backbone weights copied, attention layers fresh.

The layer-attention ResNets keep timm's (and torchvision's) ResNet key names, so a plain ResNet state
dict maps one to one onto the backbone; only the attention layers (``layerN.M.attn.*``) and their skip
flags are new. Fine-tuning from a pretrained ResNet is how the paper's ELA models are cheapest to obtain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import adapt_input_conv
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet

__all__ = ["ResNetInitReport", "init_from_resnet"]

_CLASSIFIER_PREFIX = "fc."
# timm's features_only wrappers (FeatureListNet is a FeatureDictNet)
_FEATURE_WRAPPERS = (FeatureDictNet, FeatureGetterNet, FeatureHookNet)


@dataclass
class ResNetInitReport:
    """What :func:`init_from_resnet` did, key by key (timm key names).

    - ``mapped``: copied from the ResNet checkpoint.
    - ``missing``: in the ELA model but not in the checkpoint (the attention layers and their skip flags,
      and BatchNorm step counters a checkpoint without them lacks); they keep their fresh initialisation.
    - ``unexpected``: in the checkpoint but not in the ELA model (ignored).
    - ``reinitialized_head``: classifier keys left fresh because the number of classes differs or the
      checkpoint has no classifier (a feature extractor).
    - ``adapted_stem``: the first convolution's key when the model takes another number of input channels
      (``in_chans``) than the checkpoint: its weights were adapted as timm's pretrained loader does (summed
      over the colour channels for one channel, repeated and rescaled for more).
    """

    mapped: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    reinitialized_head: List[str] = field(default_factory=list)
    adapted_stem: Optional[str] = None

    def __str__(self) -> str:
        return (
            f"{len(self.mapped)} tensors mapped from the ResNet, {len(self.missing)} left freshly initialised "
            f"(attention layers), {len(self.unexpected)} unused, classifier re-initialised: "
            f"{bool(self.reinitialized_head)}"
            + (f", {self.adapted_stem} adapted to the model's input channels" if self.adapted_stem else "")
        )


def _same_but_input_channels(theirs: torch.Size, ours: torch.Size) -> bool:
    return theirs[0] == ours[0] and theirs[2:] == ours[2:] and theirs[1] != ours[1]


def _state_dict_of(source: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise ValueError(f"expected a ResNet state dict or nn.Module, got {type(source).__name__}")
    # checkpoints saved from DDP / torch.compile / a transformers wrapper carry a prefix on every key
    keys = list(source)
    for prefix in ("module.", "_orig_mod.", "timm_model."):
        if keys and all(k.startswith(prefix) for k in keys):
            source = {k[len(prefix):]: v for k, v in source.items()}
            keys = list(source)
    return dict(source)


_BLOCK = re.compile(r"(layer\d+\.\d+)\.")


def _blocks(keys) -> set:
    """The blocks (``layer1.0``, ...) that ``keys`` hold weights of."""
    return {m.group(1) for k in keys if (m := _BLOCK.match(k))}


def _block_order(block: str):
    return tuple(int(n) for n in re.findall(r"\d+", block))


def _nested_networks(model: nn.Module) -> List[str]:
    """Paths (from ``model``) of the networks whose ResNet blocks sit below its top level: for each, the
    outermost timm features wrapper, ELA network or transformers ELA model on the way, else the blocks' parent."""
    from .ela_resnet import LayerAttentionResNet

    found: List[str] = []
    for parent in sorted({m.group(1) for k in model.state_dict() if (m := re.match(r"(.+?)\.layer\d+\.\d+\.", k))}):
        parts = parent.split(".")
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            sub = model.get_submodule(path)
            if isinstance(sub, (*_FEATURE_WRAPPERS, LayerAttentionResNet)) or hasattr(sub, "timm_model"):
                parent = path
                break
        if parent not in found:
            found.append(parent)
    return found


def _plain_name(model: nn.Module) -> str:
    """timm's plain ResNet of ``model``'s architecture (``ela_resnet50d`` -> ``resnet50d``), or ''."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or ""
    return re.sub(r"^(ela_l_|ela_|mrla_b_|mrla_l_)", "", arch) if arch else ""


def _variant_mismatch(own: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], plain: str) -> str:
    """Why ``source`` is another ResNet variant than the model (stem, downsampling), or ''."""

    def kind(state) -> Tuple[Optional[str], Optional[str]]:
        stem = "deep 3x3" if "conv1.0.weight" in state else "7x7" if "conv1.weight" in state else None
        # ResNet-D: average pool then 1x1 conv (downsample.1 is the conv); plain: strided conv then BN
        down = next((state[k] for k in sorted(state) if re.match(r"layer\d+\.0\.downsample\.1\.weight$", k)), None)
        pool = None if down is None else "average-pool" if down.dim() == 4 else "strided-conv"
        return stem, pool

    (own_stem, own_pool), (src_stem, src_pool) = kind(own), kind(source)
    if own_stem and src_stem and own_stem != src_stem or own_pool and src_pool and own_pool != src_pool:
        like = f" (timm's {plain})" if plain else ""
        return (
            f"the ResNet checkpoint is another ResNet variant: {src_stem or 'no'} stem and {src_pool or 'no'} "
            f"downsampling, where the model has a {own_stem} stem and {own_pool} downsampling; start from a "
            f"ResNet of the model's variant{like}"
        )
    return ""


@torch.no_grad()
def init_from_resnet(
    model: nn.Module, resnet: Union[nn.Module, Mapping[str, torch.Tensor]]
) -> ResNetInitReport:
    """Copy a plain ResNet's weights into the backbone of the ELA ``model`` (in place).

    ``model``: a timm layer-attention model (``timm.create_model("ela_resnet50")``) or an
    ``ElaModel``/``ElaForImageClassification``. ``resnet``: a plain timm/torchvision ResNet of the same depth,
    or its state dict (e.g. ``timm.create_model("resnet50", pretrained=True)``).

    The attention layers keep their fresh initialisation. A classifier whose shape differs (another number
    of classes), or one the checkpoint lacks, is left fresh and reported; any other shape mismatch, blocks the
    model does not have, backbone weights the checkpoint lacks, or attention weights in the checkpoint (an
    ELA/MRLA model is not a plain ResNet) raise ``ValueError``.
    """
    target = model
    for attr in ("timm_model", "model", "body"):  # transformers wrappers; timm's FeatureGetterNet, FeatureHookNet
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            target = inner
            break
    source = _state_dict_of(resnet)
    # a block's attention layer (layerN.M.attn.*): other models' ".attn." keys (ViT, Swin) are no ResNet either,
    # which the checks below say
    attention = [k for k in source if re.match(r"layer\d+\.\d+\.attn\.", k) or k.endswith("attn_skipped")]
    if attention:
        raise ValueError(
            f"the checkpoint has layer-attention weights ({len(attention)} tensors, e.g. {attention[:2]}): "
            "init_from_resnet starts the attention layers fresh from a plain ResNet. To continue from an "
            "ELA/MRLA checkpoint, load it whole (from_pretrained, timm's pretrained_cfg_overlay, or load_state_dict)"
        )
    own = target.state_dict()
    plain = _plain_name(target)
    variant = _variant_mismatch(own, source, plain)
    if variant:
        raise ValueError(variant)
    report = ResNetInitReport()
    stem = f"{(getattr(target, 'pretrained_cfg', None) or {}).get('first_conv') or 'conv1'}.weight"
    mismatched = []
    to_load = {}
    for key, value in source.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if own[key].shape != value.shape:
            if key.startswith(_CLASSIFIER_PREFIX):
                report.reinitialized_head.append(key)
                continue
            if key == stem and value.dim() == 4 and _same_but_input_channels(value.shape, own[key].shape):
                # another channel count (grey, RGB-D): as timm's own loader adapts pretrained weights to in_chans
                value = adapt_input_conv(own[key].shape[1], value)
                report.adapted_stem = key
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
                continue
        to_load[key] = value
    if report.reinitialized_head:  # the classifier is fresh as a whole, never half copied (fc.bias alone)
        report.reinitialized_head = sorted({*report.reinitialized_head,
                                            *(k for k in to_load if k.startswith(_CLASSIFIER_PREFIX))})
        to_load = {k: v for k, v in to_load.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    own_blocks = _blocks(own)
    if not own_blocks and _blocks(source):
        # the network sits deeper in a module of the user's (a detector): name where, as a path from the module
        # passed (the outermost features wrapper or network on the way: what init_from_resnet takes)
        nested = _nested_networks(model)
        if nested:
            where = ", ".join(f".{n}" for n in nested[:3]) + (" ..." if len(nested) > 3 else "")
            which = "that network" if len(nested) == 1 else "each network"
            raise ValueError(
                f"this {type(model).__name__} holds the ResNet blocks under {where}, not at its top level: initialise "
                f"{which}, init_from_resnet(model.{nested[0]}, ...)"
            )
    extra_blocks = sorted(_blocks(report.unexpected) - own_blocks, key=_block_order)
    if isinstance(model, _FEATURE_WRAPPERS):
        # a features_only backbone cut short by out_indices: timm leaves out the stages after the last feature
        # it returns, and their weights stay unused (in report.unexpected), as timm's own loader leaves them
        own_stages = {block.split(".")[0] for block in own_blocks}
        extra_blocks = [block for block in extra_blocks if block.split(".")[0] in own_stages]
    if extra_blocks:
        mismatched.append(f"blocks the model does not have, e.g. {extra_blocks[:2]} (a deeper ResNet?)")
    in_blocks = [k for k in report.unexpected if (m := _BLOCK.match(k)) and m.group(1) in own_blocks]
    if in_blocks:
        mismatched.append(
            f"weights a plain ResNet block does not have, e.g. {in_blocks[:2]} (squeeze-excitation or another "
            "block type?)"
        )
    like = f" (timm's {plain})" if plain else ""
    if mismatched:
        raise ValueError(
            f"the ResNet checkpoint does not fit this architecture ({len(mismatched)} mismatches, e.g. "
            f"{mismatched[:3]}); use a plain ResNet of the same depth and width{like}"
        )
    # BatchNorm step counters are bookkeeping, not weights: frozen BatchNorms and checkpoints older than
    # torch 0.4.1 have none, and the model keeps its own
    backbone = [k for k in own if ".attn." not in k and not k.endswith(("attn_skipped", "num_batches_tracked"))
                and not k.startswith(_CLASSIFIER_PREFIX)]
    absent = [k for k in backbone if k not in to_load]
    if absent:
        # blocks the checkpoint lacks while it has others (a checkpoint with none is no ResNet)
        source_blocks = _blocks(source)
        fewer = sorted(own_blocks - source_blocks, key=_block_order) if source_blocks else []
        why = (f"it has no blocks {fewer[:3]} (a shallower ResNet?); use a plain ResNet of the same depth{like}"
               if fewer else f"is it a plain ResNet of the same architecture{like}?")
        raise ValueError(
            f"the ResNet checkpoint lacks {len(absent)} of the model's {len(backbone)} backbone tensors, e.g. "
            f"{absent[:3]}; {why}"
        )
    for key, value in to_load.items():
        own[key].copy_(value)
    report.mapped = sorted(to_load)
    if not any(k.startswith(_CLASSIFIER_PREFIX) for k in source):  # a headless checkpoint: the head stays fresh
        report.reinitialized_head.extend(k for k in own if k.startswith(_CLASSIFIER_PREFIX))
    report.missing = sorted(k for k in own if k not in to_load and k not in report.reinitialized_head)
    report.unexpected.sort()
    report.reinitialized_head.sort()
    return report
