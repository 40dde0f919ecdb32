"""The ZoomLDM Summarizer: SSL-embedding grid + magnification -> 65 conditioning tokens.

Re-implements the official `ldm/modules/encoders/modules.py::EmbeddingViT2_5` (reference notes §1.3):

1. the h x w grid of SSL embeddings (h = w in {1, 2, 4, 8}) is flattened row-major to n = h*w tokens and
   projected C -> D (`dim_reduce`);
2. the n tokens are placed in the *centre* of a 64-slot sequence (1 token at slot 32, n in {4, 16} at
   slots [32 - n/2, 32 + n/2), 64 tokens unchanged); every other slot holds one learned `pad_token`;
3. a magnification token (`mag_embedding`) is prepended -> 65 tokens;
4. a pre-LN ViT encoder (torchvision `vision_transformer.Encoder` semantics: learned positional embedding,
   GELU MLP, LayerNorm eps 1e-6, final LayerNorm) runs over the 65 tokens;
5. `final_proj` Linear and an extra LayerNorm (the "2_5" change) give the (65, D) context.

Parameter and buffer names are identical to the official ones, so an official `cond_stage_model.*` state dict
(prefix removed) loads with a strict `load_state_dict`.

Classifier-free guidance: the official `encode` multiplies the whole output by 0 with probability `p_uncond`
(even in eval mode, a known pitfall). Here `forward` never drops anything: the null context is
`null_context_like(ctx)` (all zeros) and the trainer applies the dropout; `SummarizerConfig.p_uncond` is kept
only so the trainer can read the official value.

Mixed grid sizes in one batch: `forward(grid, mag, grid_size=None)` accepts
  * a tensor (N, C, h, h) whose items all have side h, or
  * a list of N tensors (C, h_i, h_i) with different sides (as the official data loader produces), or
  * a padded tensor (N, C, S, S) plus `grid_size` (N,) long: item i's grid is `grid[i, :, :g_i, :g_i]`
    (top-left corner; the rest is ignored). `pad_grids` builds this form from a list, e.g. in a collate_fn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoomldm.models.errors import build_checked

logger = logging.getLogger(__name__)

NUM_GRID_SLOTS = 64  # the grid part of the sequence: an 8 x 8 grid, or a smaller one centred and padded
GRID_SIDES = (1, 2, 4, 8)  # larger grids are average-pooled to 8 x 8 by the data loader (official brca.py)


@dataclasses.dataclass(frozen=True)
class SummarizerConfig:
    """Hyper-parameters of the Summarizer. Defaults are the paper (BRCA) model, 38.7 M parameters."""

    input_dim: int = 1024  # C of the SSL embedding grid (UNI: 1024)            official `input_channels`
    hidden_dim: int = 512  # D, width of the ViT and of the output tokens          `hidden_channels`
    mlp_dim: int = 2048  # ViT MLP width                                            `vit_mlp_dim`
    depth: int = 12  # number of ViT blocks                                         `num_layers`
    num_heads: int = 8  #                                                           `num_heads`
    mag_levels: int = 8  # number of magnification indices (8 BRCA, 4 NAIP)         `mag_levels`
    p_uncond: float = 0.1  # CFG dropout rate for the *trainer*; unused in forward  `p_uncond`

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden_dim", "mlp_dim", "depth", "num_heads", "mag_levels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SummarizerConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"SummarizerConfig: hidden_dim {self.hidden_dim} not divisible by "
                             f"num_heads {self.num_heads}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"SummarizerConfig.p_uncond must be in [0, 1), got {self.p_uncond!r}")

    # Official constructor argument (EmbeddingViT2.__init__) -> our field; None = accepted, no effect here.
    _OFFICIAL_NAMES = {
        "input_channels": "input_dim", "hidden_channels": "hidden_dim", "vit_mlp_dim": "mlp_dim",
        "num_layers": "depth", "num_heads": "num_heads", "mag_levels": "mag_levels", "p_uncond": "p_uncond",
        "output_channels": None, "seq_length": None, "feat_key": None, "mag_key": None,
        "ckpt_path": None, "ignore_keys": None,
    }

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any] | str) -> SummarizerConfig:
        """Build from the official `EmbeddingViT2_5` constructor arguments (dict or JSON string).

        Missing arguments take the official constructor defaults (which equal the paper model, except
        `p_uncond`, whose official default is 0 while the paper YAML sets 0.1).
        """
        cfg = json.loads(cfg) if isinstance(cfg, str) else dict(cfg)
        unknown = sorted(set(cfg) - set(cls._OFFICIAL_NAMES))
        if unknown:
            raise ValueError(f"Summarizer config: unknown official argument(s) {unknown}; "
                             f"known: {sorted(cls._OFFICIAL_NAMES)}")
        hidden = cfg.get("hidden_channels", 512)
        # The official extra LayerNorm is built over hidden_channels, so it only runs when out == hidden.
        if cfg.get("output_channels", hidden) != hidden:
            raise ValueError(f"Summarizer config: output_channels {cfg['output_channels']} != "
                             f"hidden_channels {hidden}; EmbeddingViT2_5 only works when they are equal")
        if cfg.get("seq_length", NUM_GRID_SLOTS) != NUM_GRID_SLOTS:
            raise ValueError(f"Summarizer config: seq_length must be {NUM_GRID_SLOTS} (the centred padding "
                             f"is hard-coded to 64 slots), got {cfg['seq_length']}")
        kwargs = {ours: cfg[off] for off, ours in cls._OFFICIAL_NAMES.items() if ours and off in cfg}
        kwargs.setdefault("p_uncond", 0.0)
        return cls(**kwargs)

    def to_official(self) -> dict[str, Any]:
        """The official constructor arguments that rebuild this architecture."""
        out = {off: getattr(self, ours) for off, ours in self._OFFICIAL_NAMES.items() if ours}
        return {**out, "output_channels": self.hidden_dim, "seq_length": NUM_GRID_SLOTS}


SUMMARIZER_PRESETS: dict[str, SummarizerConfig] = {
    "paper": SummarizerConfig(),  # BRCA; NAIP is dataclasses.replace(..., mag_levels=4)
    # CPU-sized, same topology; input_dim 1280 = our EfficientNet-Lite0 stand-in encoder
    # (other encoders: dataclasses.replace(SUMMARIZER_PRESETS["small"], input_dim=...)).
    "small": SummarizerConfig(input_dim=1280, hidden_dim=128, mlp_dim=512, depth=2, num_heads=4),
}


def null_context_like(context: torch.Tensor) -> torch.Tensor:
    """The classifier-free-guidance null condition: all zeros, as in the official `encode` (§1.3)."""
    return torch.zeros_like(context)


def pad_grids(grids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack square grids (C, h_i, h_i) of different sides into (N, C, S, S), S = max h_i, top-left aligned.

    Returns the padded tensor and the per-item side `grid_size` (N,) long, the form `Summarizer` accepts.
    """
    if len(grids) == 0:
        raise ValueError("pad_grids: empty list of grids")
    for i, g in enumerate(grids):
        if g.dim() != 3 or g.shape[1] != g.shape[2]:
            raise ValueError(f"pad_grids: grid {i} must be (C, h, h), got {tuple(g.shape)}")
    side = max(g.shape[-1] for g in grids)
    out = grids[0].new_zeros(len(grids), grids[0].shape[0], side, side)
    for i, g in enumerate(grids):
        out[i, :, : g.shape[-1], : g.shape[-1]] = g
    grid_size = torch.tensor([g.shape[-1] for g in grids], dtype=torch.long, device=out.device)
    return out, grid_size


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout, computed with SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # rows: [q; k; v]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, T, 3D)
        qkv = qkv.view(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.out_proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block (torchvision ViT `EncoderBlock`, dropout 0)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        # Slot 2 (torchvision: Dropout(0)) holds no parameters; keeping it makes the second Linear `mlp.3`.
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Identity(), nn.Linear(mlp_dim, dim))
        for layer in (self.mlp[0], self.mlp[3]):  # torchvision MLPBlock init
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """torchvision ViT `Encoder`: learned positional embedding, `depth` blocks, final LayerNorm."""

    def __init__(self, seq_len: int, depth: int, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, num_heads, mlp_dim)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class Summarizer(nn.Module):
    """`Summarizer(grid, mag) -> (N, 65, D)` context for the UNet's cross-attention (reference §1.3)."""

    def __init__(self, config: SummarizerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.mag_embedding = nn.Embedding(config.mag_levels, d)
        self.dim_reduce = nn.Linear(config.input_dim, d)
        self.pad_token = nn.Parameter(torch.randn(1, 1, d))
        self.encoder = Encoder(NUM_GRID_SLOTS + 1, config.depth, d, config.num_heads, config.mlp_dim)
        self.final_proj = nn.Linear(d, d)
        self.layer_norm = nn.LayerNorm(d)  # default eps 1e-5, unlike the encoder's 1e-6

    def tokenize(self, grid: torch.Tensor, grid_size: torch.Tensor) -> torch.Tensor:
        """Project and centre-pad grids: (N, C, S, S) + sides (N,) -> (N, 64, D).

        Item i's n = g_i^2 tokens (row-major over grid[i, :, :g_i, :g_i]) go to slots
        [32 - n//2, 32 - n//2 + n): slot 32 for n = 1, [30, 34) for 2x2, [24, 40) for 4x4, all 64 for 8x8.
        """
        n_items, _, side, _ = grid.shape
        feats = self.dim_reduce(grid.flatten(2).transpose(1, 2))  # (N, S*S, D)
        g = grid_size.to(device=grid.device, dtype=torch.long)[:, None]  # (N, 1)
        start = NUM_GRID_SLOTS // 2 - (g * g) // 2  # (N, 1)
        k = torch.arange(NUM_GRID_SLOTS, device=grid.device)[None] - start  # (N, 64) grid token per slot
        valid = (k >= 0) & (k < g * g)  # (N, 64)
        k = k.clamp(min=0)
        src = torch.where(valid, (k // g) * side + k % g, 0)  # (N, 64) index into the S*S flattened grid
        tokens = feats.gather(1, src[..., None].expand(-1, -1, feats.shape[-1]))  # (N, 64, D)
        return torch.where(valid[..., None], tokens, self.pad_token.to(tokens.dtype))  # (N, 64, D)

    def forward(self, grid: torch.Tensor | Sequence[torch.Tensor], mag: torch.Tensor,
                grid_size: torch.Tensor | None = None) -> torch.Tensor:
        """grid: (N, C, h, h), a list of (C, h_i, h_i), or padded (N, C, S, S) with `grid_size` (N,);
        mag: (N,) long magnification indices. Returns the context (N, 65, D)."""
        if not isinstance(grid, torch.Tensor):
            if grid_size is not None:
                raise ValueError("Summarizer: grid_size is only used with a padded tensor, not with a list")
            grid, grid_size = pad_grids(list(grid))
        self._check_inputs(grid, mag, grid_size)
        if grid_size is None:
            grid_size = torch.full((grid.shape[0],), grid.shape[-1], dtype=torch.long, device=grid.device)
        tokens = self.tokenize(grid, grid_size)  # (N, 64, D)
        x = torch.cat([self.mag_embedding(mag)[:, None], tokens], dim=1)  # (N, 65, D)
        x = self.encoder(x)  # (N, 65, D)
        return self.layer_norm(self.final_proj(x))  # (N, 65, D)

    def _check_inputs(self, grid: torch.Tensor, mag: torch.Tensor, grid_size: torch.Tensor | None) -> None:
        cfg = self.config
        if grid.dim() != 4 or grid.shape[2] != grid.shape[3] or grid.shape[1] != cfg.input_dim:
            raise ValueError(f"Summarizer: grid must be (N, {cfg.input_dim}, h, h), got {tuple(grid.shape)}")
        if mag.shape != (grid.shape[0],):
            raise ValueError(f"Summarizer: mag must be ({grid.shape[0]},), got {tuple(mag.shape)}")
        if mag.dtype.is_floating_point:
            raise ValueError(f"Summarizer: mag must be an integer tensor, got {mag.dtype}")
        if grid_size is None:
            sides = {grid.shape[-1]}
        else:
            if grid_size.shape != mag.shape:
                raise ValueError(f"Summarizer: grid_size must be ({grid.shape[0]},), "
                                 f"got {tuple(grid_size.shape)}")
            sides = set(grid_size.tolist())  # one host sync; cheap next to the transformer
            if max(sides) > grid.shape[-1]:
                raise ValueError(f"Summarizer: grid_size {max(sides)} exceeds the padded side "
                                 f"{grid.shape[-1]}")
        if not sides <= set(GRID_SIDES):
            raise ValueError(f"Summarizer: grid sides must be in {GRID_SIDES} (pool larger grids to 8x8), "
                             f"got {sorted(sides)}")
        if mag.numel() and (int(mag.min()) < 0 or int(mag.max()) >= cfg.mag_levels):
            raise ValueError(f"Summarizer: mag indices must be in [0, {cfg.mag_levels}), got {mag.tolist()}")


def summarizer_from_official(state_dict: Mapping[str, torch.Tensor],
                             config: Mapping[str, Any] | str) -> Summarizer:
    """Build a Summarizer from an official `EmbeddingViT2_5` state dict (keys without `cond_stage_model.`)
    and its constructor arguments (dict or JSON string). Every key and shape is checked."""
    config_ = SummarizerConfig.from_official(config)
    model = build_checked(lambda: Summarizer(config_), state_dict, "Summarizer (EmbeddingViT2_5)")
    logger.info("loaded official Summarizer: %d tensors, %.1f M parameters", len(state_dict),
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def num_params(module: nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
