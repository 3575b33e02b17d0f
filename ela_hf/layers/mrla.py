"""Multi-head recurrent layer attention (MRLA-L and MRLA-B), SPEC.md sections 1-3.

Both layers sit after a ResNet block's residual add and ReLU. They are called by
:class:`ela_hf.models.ela_resnet.LayerAttentionStage`, which owns one :class:`StageState` per forward
pass of a stage: the MRLA-B key/value cache, and (only while KL recording is on) what is needed to
compute the adjacent-layer KL divergence of SPEC section 3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

__all__ = [
    "eca_kernel_size",
    "MrlaLight",
    "MrlaBase",
    "StageState",
    "kl_with_appended_eps",
    "DEFAULT_KL_EPS",
]

DEFAULT_KL_EPS = 1e-8


def eca_kernel_size(channels: int) -> int:
    """ECA rule for the Conv1d kernel of Q and K: odd, growing with log2(channels)."""
    t = int(abs((math.log2(channels) + 1) / 2))
    return t if t % 2 else t + 1


def kl_with_appended_eps(prev: torch.Tensor, cur: torch.Tensor, eps: float = DEFAULT_KL_EPS) -> torch.Tensor:
    """``KL(p || cur)`` with ``p = renormalise([prev..., eps])`` over the last dim (SPEC section 3).

    ``prev`` has one entry fewer than ``cur`` along the last dim. Computed in float32; ``cur`` is
    clamped by ``eps`` so the divergence stays finite. Returns the divergence with the last dim reduced.
    """
    prev = prev.float()
    cur = cur.float()
    p = torch.cat([prev, prev.new_full(prev.shape[:-1] + (1,), eps)], dim=-1)
    p = p / p.sum(dim=-1, keepdim=True)
    q = cur.clamp_min(eps)
    return (torch.xlogy(p, p) - p * torch.log(q)).sum(dim=-1)


@dataclass
class StageState:
    """What flows between the blocks of one stage during one forward pass.

    MRLA-B keeps its cache as per-layer lists: keys are tiny (``[B, heads, d]``) and are stacked per
    block; values are never copied, each block accumulates ``sum_s A_s * V_s`` directly.
    """

    keys: List[torch.Tensor] = field(default_factory=list)
    values: List[torch.Tensor] = field(default_factory=list)
    # recording only: the previous active layer's attention distribution over the stage's layers
    prev_alpha: Optional[torch.Tensor] = None
    # recording only (MRLA-L): unrolled per-channel weights w_{t,s,c}, shape [B, n_layers, C]
    unrolled: Optional[torch.Tensor] = None


class _LayerAttentionBase(nn.Module):
    """Shared pieces: Q/K Conv1d on the pooled descriptor, depthwise V, BN, DropPath, KL accumulators."""

    def __init__(self, channels: int, dim_per_head: int, k_size: Optional[int], drop_path: float):
        super().__init__()
        if channels % dim_per_head != 0:
            raise ValueError(
                f"channels ({channels}) must be a multiple of dim_per_head ({dim_per_head}) for layer attention"
            )
        self.channels = channels
        self.dim_per_head = dim_per_head
        self.heads = channels // dim_per_head
        self.k_size = k_size if k_size is not None else eca_kernel_size(channels)
        self.scale = 1.0 / math.sqrt(dim_per_head)
        pad = (self.k_size - 1) // 2
        self.wq = nn.Conv1d(1, 1, self.k_size, padding=pad, bias=False)
        self.wk = nn.Conv1d(1, 1, self.k_size, padding=pad, bias=False)
        self.wv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        nn.init.kaiming_normal_(self.wv.weight, mode="fan_out", nonlinearity="relu")
        # KL statistics (SPEC section 3): on-device float32 sums, never synced per step. Not persistent:
        # they are training-time bookkeeping, saved for resume by the pruning callback, not by checkpoints.
        self.register_buffer("kl_sum", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("kl_count", torch.zeros((), dtype=torch.float32), persistent=False)
        self.recording = False
        self.kl_eps = DEFAULT_KL_EPS

    def _query_key(self, y: torch.Tensor):
        g = y.mean(dim=(2, 3)).unsqueeze(1)  # [B, 1, C]
        b = g.shape[0]
        q = self.wq(g).view(b, self.heads, self.dim_per_head)
        k = self.wk(g).view(b, self.heads, self.dim_per_head)
        return q, k

    def _per_channel(self, per_head: torch.Tensor) -> torch.Tensor:
        """[B, heads, ...] -> [B, C, ...]: head h covers the contiguous channels h*d .. (h+1)*d - 1."""
        return per_head.repeat_interleave(self.dim_per_head, dim=1)

    def _records(self) -> bool:
        return self.recording and self.training

    @torch.no_grad()
    def _accumulate(self, d: torch.Tensor) -> None:
        """d: [B] (already averaged over heads) -> add to the running float32 sum and count."""
        self.kl_sum += d.float().sum()
        self.kl_count += d.shape[0]

    def reset_kl(self) -> None:
        self.kl_sum.zero_()
        self.kl_count.zero_()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, k_size={self.k_size}"


class MrlaLight(_LayerAttentionBase):
    """MRLA-L: ``out = y + DropPath(BN(sigmoid(<Q_h,K_h>/sqrt d) * V_h + lambda * sc))``.

    The previous layers reach layer t through the shortcut ``sc`` (the residual stream), so nothing is
    cached. Extra parameters: 12C + 2*k_size.
    """

    def __init__(self, channels: int, dim_per_head: int = 32, k_size: Optional[int] = None, drop_path: float = 0.0):
        super().__init__(channels, dim_per_head, k_size, drop_path)
        self.lam = nn.Parameter(torch.randn(channels, 1, 1))

    def forward(self, y: torch.Tensor, sc: torch.Tensor, state: StageState) -> torch.Tensor:
        q, k = self._query_key(y)
        gate = torch.sigmoid((q * k).sum(-1) * self.scale)  # [B, heads]
        v = self.wv(y)
        o = v * self._per_channel(gate)[:, :, None, None] + self.lam * sc
        if self._records():
            self._record(gate, state)
        return y + self.drop_path(self.bn(o))

    @torch.no_grad()
    def _record(self, gate: torch.Tensor, state: StageState) -> None:
        # w_{t,s,c} = a_{s,h(c)} * prod_{active j, s<j<=t} lambda_{j,c}: scale the earlier layers by this
        # layer's lambda, then append this layer's own gate (empty product).
        own = self._per_channel(gate.float()).unsqueeze(1)  # [B, 1, C]
        if state.unrolled is None:
            unrolled = own
        else:
            unrolled = torch.cat([state.unrolled * self.lam.detach().float().view(1, 1, -1), own], dim=1)
        alpha = unrolled.abs().mean(dim=-1)
        alpha = alpha / alpha.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(alpha.dtype).tiny)
        if state.prev_alpha is not None:
            self._accumulate(kl_with_appended_eps(state.prev_alpha, alpha, self.kl_eps))
        state.unrolled = unrolled
        state.prev_alpha = alpha


class MrlaBase(_LayerAttentionBase):
    """MRLA-B: softmax attention of layer t over the stage's cached (K_s, V_s) of active layers.

    ``out = y + DropPath(relu(BN(sum_s A_s V_s)))``. Extra parameters: 11C + 2*k_size.
    """

    def __init__(self, channels: int, dim_per_head: int = 16, k_size: Optional[int] = None, drop_path: float = 0.0):
        super().__init__(channels, dim_per_head, k_size, drop_path)

    def forward(self, y: torch.Tensor, state: StageState) -> torch.Tensor:
        q, k = self._query_key(y)
        v = self.wv(y)
        state.keys.append(k)
        state.values.append(v)
        keys = torch.stack(state.keys, dim=2)  # [B, heads, t, d]: tiny, unlike the values
        attn = torch.softmax(torch.einsum("bhd,bhtd->bht", q, keys) * self.scale, dim=-1)
        weights = self._per_channel(attn).to(v.dtype)[..., None, None]  # [B, C, t, 1, 1]
        o = state.values[0] * weights[:, :, 0]
        for s in range(1, len(state.values)):
            o = o.addcmul_(state.values[s], weights[:, :, s])
        if self._records():
            self._record(attn, state)
        return y + self.drop_path(F.relu(self.bn(o)))

    @torch.no_grad()
    def _record(self, attn: torch.Tensor, state: StageState) -> None:
        attn = attn.detach().float()
        if state.prev_alpha is not None:
            self._accumulate(kl_with_appended_eps(state.prev_alpha, attn, self.kl_eps).mean(dim=1))
        state.prev_alpha = attn
