"""The Conditioning Diffusion Model (CDM): a DiT over the Summarizer's 65 output tokens.

Re-implements the official `cdm_dit/models.py::DiT` (reference notes §4), which is the DiT of Peebles & Xie
(facebookresearch/DiT) adapted to token sequences:

* no patchify: each of the 65 Summarizer tokens (channels C = 512) is one DiT token, `x_embedder` is a
  Linear C -> hidden, and the positional embedding is a fixed 1-D sin-cos table over 65 positions (kept, as
  in the official code, as an `nn.Parameter` with requires_grad=False so it sits in the state dict);
* conditioning c = TimestepEmbedder(t) + LabelEmbedder(mag), injected through adaLN-Zero DiT blocks
  (qkv bias, MLP ratio 4, tanh-GELU);
* FinalLayer: adaLN + Linear hidden -> 2C with learned sigma (C mean channels, then C variance channels).

The official CDM trains with `class_dropout_prob = 0`, i.e. no classifier-free guidance, so there is no null
label row in `y_embedder`; other values are rejected. Input/output are channels-first (N, C, 65), as in the
official forward. Parameter names are identical to the official ones (strict `load_state_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoomldm.models.errors import build_checked

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CDMConfig:
    """Hyper-parameters of the CDM. Defaults are the paper model (`--model DiT-B`), 130.7 M parameters."""

    in_channels: int = 512  # C, the Summarizer's token width               official `in_channels`
    num_tokens: int = 65  # T, 1 magnification token + 64 grid tokens         `num_patches`
    hidden_size: int = 768  # DiT width                                       `hidden_size`
    depth: int = 12  #                                                        `depth`
    num_heads: int = 12  #                                                    `num_heads`
    mlp_ratio: float = 4.0  #                                                 `mlp_ratio`
    mag_levels: int = 8  # number of magnification classes                    `num_classes`
    learn_sigma: bool = True  # output 2C channels (mean, variance)           `learn_sigma`
    frequency_embedding_size: int = 256  # sinusoid width before the timestep MLP (fixed in the official code)

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_tokens", "hidden_size", "depth", "num_heads", "mag_levels",
                     "frequency_embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CDMConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads or self.hidden_size % 2:
            raise ValueError(f"CDMConfig: hidden_size {self.hidden_size} must be even and divisible by "
                             f"num_heads {self.num_heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"CDMConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"CDMConfig.learn_sigma must be a bool, got {self.learn_sigma!r}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    # Official DiT.__init__ argument -> our field (class_dropout_prob is validated separately).
    _OFFICIAL_NAMES = {
        "num_patches": "num_tokens", "in_channels": "in_channels", "hidden_size": "hidden_size",
        "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "num_classes": "mag_levels",
        "learn_sigma": "learn_sigma", "class_dropout_prob": None,
    }
    # Official DiT.__init__ defaults (DiT-XL width/depth); the DiT-B factory overrides depth/hidden/heads.
    _OFFICIAL_DEFAULTS = {
        "num_patches": 65, "in_channels": 512, "hidden_size": 1152, "depth": 28, "num_heads": 16,
        "mlp_ratio": 4.0, "class_dropout_prob": 0, "num_classes": 8, "learn_sigma": True,
    }

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any] | str) -> CDMConfig:
        """Build from the official `cdm_dit.models.DiT` constructor arguments (dict or JSON string).

        Missing arguments take the official constructor defaults.
        """
        cfg = json.loads(cfg) if isinstance(cfg, str) else dict(cfg)
        unknown = sorted(set(cfg) - set(cls._OFFICIAL_NAMES))
        if unknown:
            raise ValueError(f"CDM config: unknown official argument(s) {unknown}; "
                             f"known: {sorted(cls._OFFICIAL_NAMES)}")
        cfg = {**cls._OFFICIAL_DEFAULTS, **cfg}
        if cfg["class_dropout_prob"] != 0:
            raise ValueError(f"CDM config: class_dropout_prob must be 0 (the official CDM has no CFG and no "
                             f"null-label row), got {cfg['class_dropout_prob']}")
        kwargs = {ours: cfg[off] for off, ours in cls._OFFICIAL_NAMES.items() if ours}
        kwargs["mlp_ratio"] = float(kwargs["mlp_ratio"])
        return cls(**kwargs)

    def to_official(self) -> dict[str, Any]:
        """The official constructor arguments that rebuild this architecture."""
        out = {off: getattr(self, ours) for off, ours in self._OFFICIAL_NAMES.items() if ours}
        return {**out, "class_dropout_prob": 0}


CDM_PRESETS: dict[str, CDMConfig] = {
    "paper": CDMConfig(),  # DiT-B: depth 12, hidden 768, 12 heads over 65 x 512 tokens
    # CPU-sized, same topology; in_channels = the small Summarizer's hidden_dim.
    "small": CDMConfig(in_channels=128, hidden_size=96, depth=2, num_heads=4),  # in = small Summarizer width
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, T, D) * (1 + scale (N, D)) + shift (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed_1d(dim: int, num_positions: int) -> torch.Tensor:
    """Fixed 1-D sin-cos positional embedding (num_positions, dim): [sin(p * w_i), cos(p * w_i)],
    w_i = 10000^(-i / (dim/2)) (DiT/MAE `get_1d_sincos_pos_embed_from_grid`; computed in float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (D/2,)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * omega[None]  # (T, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # (T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps: 256-d sinusoid [cos, sin] -> Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) possibly fractional timesteps -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = P^(-i/(dim/2))."""
        half = dim // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * i / half)  # (dim/2,)
        args = t[:, None].float() * freqs[None]  # (N, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*(dim/2))
        return F.pad(emb, (0, dim % 2))  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds magnification indices (the DiT class label); no null row since the CDM uses no CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (timm `Attention` layout, qkv bias), computed with SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm `Mlp` layout, dropout 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """DiT block with adaptive LayerNorm-Zero conditioning (DiT paper §3.2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear hidden -> out_channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, out_channels)


class ConditionDiT(nn.Module):
    """`ConditionDiT(x (N, C, 65), timesteps (N,), mag (N,)) -> (N, 2C, 65)` (reference §4)."""

    def __init__(self, config: CDMConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = nn.Linear(config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, config.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(config.mag_levels, d)
        # Fixed sin-cos table, a frozen Parameter as in the official code (so it is part of the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, config.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT initialisation: xavier Linears, N(0, 0.02) embeddings, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.copy_(sincos_pos_embed_1d(self.config.hidden_size, self.config.num_tokens)[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed:  # adaLN-Zero: every block starts as the identity and the output as 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        """x: (N, C, T) noisy Summarizer tokens, channels first; timesteps: (N,); mag: (N,) long.
        Returns (N, 2C, T) with learn_sigma (mean channels first), else (N, C, T)."""
        cfg = self.config
        if x.dim() != 3 or x.shape[1:] != (cfg.in_channels, cfg.num_tokens):
            raise ValueError(f"ConditionDiT: x must be (N, {cfg.in_channels}, {cfg.num_tokens}), "
                             f"got {tuple(x.shape)}")
        if timesteps.shape != (x.shape[0],) or mag.shape != (x.shape[0],):
            raise ValueError(f"ConditionDiT: timesteps and mag must be ({x.shape[0]},), "
                             f"got {tuple(timesteps.shape)} and {tuple(mag.shape)}")
        bad_range = mag.numel() and (int(mag.min()) < 0 or int(mag.max()) >= cfg.mag_levels)
        if mag.dtype.is_floating_point or bad_range:
            raise ValueError(f"ConditionDiT: mag must be integer indices in [0, {cfg.mag_levels}), "
                             f"got {mag.tolist()}")
        h = self.x_embedder(x.transpose(1, 2)) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(timesteps) + self.y_embedder(mag)  # (N, D)
        for block in self.blocks:
            h = block(h, c)  # (N, T, D)
        return self.final_layer(h, c).transpose(1, 2)  # (N, out_channels, T)


def cdm_from_official(state_dict: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any] | str) -> ConditionDiT:
    """Build a ConditionDiT from an official `cdm_dit.models.DiT` state dict and its constructor arguments
    (dict or JSON string). Every key and shape is checked; `pos_embed` is taken from the checkpoint."""
    config_ = CDMConfig.from_official(config)
    model = build_checked(lambda: ConditionDiT(config_), state_dict, "CDM (cdm_dit DiT)")
    logger.info("loaded official CDM: %d tensors, %.1f M trainable parameters", len(state_dict),
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return model
