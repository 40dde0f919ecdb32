"""VQ-f4 first stage (official `ldm/models/autoencoder.py::VQModelInterface`, reference report §1.2).

Encoder/Decoder of `ldm/modules/diffusionmodules/model.py`, a nearest-codebook vector quantiser, and 1x1
`quant_conv`/`post_quant_conv`. Parameter names equal the official ones (`encoder.`, `decoder.`, `quant_conv`,
`quantize.embedding`, `post_quant_conv`), so an official state dict (keys under `first_stage_model.`) loads
strictly; see `vq_from_official`.

    vq = VQModel(VQ_PRESETS["paper"])
    z = vq.encode(img)              # img in [-1, 1], (B, 3, H, W) -> pre-quantisation latent (B, 3, H/4, W/4)
    img = vq.decode(z)              # quantises to the nearest code first (official default)
    z_q, codes = vq.quantize(z)     # codes (B, H/4, W/4), int64

ZoomLDM's diffusion latents are the unscaled pre-quantisation latents (`scale_factor` 1). Training losses of
the autoencoder are not implemented: it is frozen in ZoomLDM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoomldm.models.errors import build_checked, strip_prefix


@dataclass(frozen=True)
class VQConfig:
    """Architecture of the VQ autoencoder; names follow the official `ddconfig` (`out_ch`: `out_channels`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)  # len - 1 = number of 2x downsamplings (f4)
    num_res_blocks: int = 2
    # Feature-map sides that get self-attention after every ResnetBlock (the mid-block always has one).
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 3
    embed_dim: int = 3
    n_embed: int = 8192
    resolution: int = 256  # image side; only used to place `attn_resolutions`
    dropout: float = 0.0

    def __post_init__(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        if not widths or any(w % 32 for w in widths) or self.num_res_blocks < 1:
            raise ValueError(
                f"VQConfig: widths {widths} must be positive multiples of 32 (GroupNorm with 32 groups)"
            )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any]) -> VQConfig:
        """Map official `VQModelInterface` arguments (`embed_dim`, `n_embed`, `ddconfig`, ...) to ours."""
        for key, value in cfg.items():
            if key in _OFFICIAL_FIXED:
                if value not in _OFFICIAL_FIXED[key]:
                    raise ValueError(
                        f"official VQ config: unsupported {key}={value!r} (allowed: {_OFFICIAL_FIXED[key]})"
                    )
            elif key not in ("ddconfig", "n_embed", "embed_dim", *_OFFICIAL_IGNORED):
                raise ValueError(f"official VQ config: unknown argument {key!r}")
        missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in cfg]
        if missing:
            raise ValueError(f"official VQ config: missing required argument(s) {missing}")
        dd = dict(cfg["ddconfig"])
        for key, value in dd.items():
            if key in _DD_FIXED:
                if value not in _DD_FIXED[key]:
                    raise ValueError(
                        f"official VQ ddconfig: unsupported {key}={value!r} (allowed: {_DD_FIXED[key]})"
                    )
            elif key not in _DD_FIELDS:
                raise ValueError(f"official VQ ddconfig: unknown argument {key!r}")
        missing = [k for k in _DD_FIELDS if k not in dd and k not in ("dropout", "ch_mult")]
        if missing:
            raise ValueError(f"official VQ ddconfig: missing required argument(s) {missing}")
        dd.setdefault("ch_mult", (1, 2, 4, 8))  # the official Encoder/Decoder default
        kwargs = {ours: dd[theirs] for theirs, ours in _DD_FIELDS.items() if theirs in dd}
        kwargs["ch_mult"] = tuple(int(m) for m in kwargs["ch_mult"])
        kwargs["attn_resolutions"] = tuple(int(r) for r in kwargs["attn_resolutions"])
        return cls(embed_dim=int(cfg["embed_dim"]), n_embed=int(cfg["n_embed"]), **kwargs)


# Official argument name -> ours, and arguments accepted only with the listed values.
_DD_FIELDS = {
    "in_channels": "in_channels",
    "out_ch": "out_channels",
    "ch": "ch",
    "ch_mult": "ch_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "z_channels": "z_channels",
    "resolution": "resolution",
    "dropout": "dropout",
}
_DD_FIXED: dict[str, tuple[Any, ...]] = {
    "double_z": (False,),  # a VQ encoder outputs z_channels, not a (mean, logvar) pair
    "resamp_with_conv": (True,),
    "use_linear_attn": (False,),
    "attn_type": ("vanilla",),
    "give_pre_end": (False,),
    "tanh_out": (False,),
}
_OFFICIAL_FIXED: dict[str, tuple[Any, ...]] = {
    "remap": (None,),
    "colorize_nlabels": (None,),
    "use_ema": (False,),
}
# Training-only or loading-only arguments with no effect on the module.
_OFFICIAL_IGNORED = (
    "lossconfig", "ckpt_path", "ignore_keys", "image_key", "monitor", "batch_resize_range",
    "scheduler_config", "lr_g_factor", "sane_index_shape",
)  # fmt: skip


VQ_PRESETS: dict[str, VQConfig] = {
    # LDM/ZoomLDM vq-f4 (55.3 M parameters).
    "paper": VQConfig(),
    # Same topology (3 levels, f4, mid-block attention only) for CPU runs on 64-px images -> 16x16 latents.
    "small": VQConfig(ch=32, n_embed=512, resolution=64),
    # The CPU demo's stand-in: still f4 with 3 levels and mid-block attention, ~1/3 of small's FLOPs. Trained on
    # 32-px crops it reconstructs the demo tiles far better than `small` in the same minutes (bench note in
    # README: held-out MAE 25.6 vs 37.5 on [0, 255] after 150 s on one core).
    "tiny": VQConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, n_embed=512, resolution=64),
}


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6), the normalisation of the official autoencoder."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice with a residual; 1x1 `nin_shortcut` when the width changes (no timestep input)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv q/k/v/proj_out (with biases), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (
            conv(y).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v)
        )  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C) as official
        out = out[:, 0].transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3x3 stride-2 conv after zero-padding right and bottom by one (official asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (empty or one AttnBlock per block), and a
    resampler registered by the caller as `downsample` or `upsample` (official module layout)."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Mid(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = c.ch, c.resolution
        for i_level, mult in enumerate(c.ch_mult):
            block_out = c.ch * mult
            blocks = [
                ResnetBlock(block_in if i == 0 else block_out, block_out, c.dropout)
                for i in range(c.num_res_blocks)
            ]
            attn = [AttnBlock(block_out) for _ in blocks] if res in c.attn_resolutions else []
            level = Level(blocks, attn)
            if i_level != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_out)
                res //= 2
            self.down.append(level)
            block_in = block_out
        self.mid = Mid(block_in, c.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, f*h, f*w); `up[i]` is level i (0: full res)."""

    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // c.downsampling
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in, c.dropout)
        levels: list[Level] = []
        for i_level in reversed(range(len(c.ch_mult))):
            block_out = c.ch * c.ch_mult[i_level]
            blocks = [
                ResnetBlock(block_in if i == 0 else block_out, block_out, c.dropout)
                for i in range(c.num_res_blocks + 1)
            ]
            attn = [AttnBlock(block_out) for _ in blocks] if res in c.attn_resolutions else []
            level = Level(blocks, attn)
            if i_level != 0:
                level.upsample = Upsample(block_out)
                res *= 2
            levels.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser (taming `VectorQuantizer2`, legacy): `forward(z) -> (z_q, codes)`.

    Distances are ||z||^2 + ||e||^2 - 2 z.e as in the official code (same argmin on ties), computed in row
    chunks so an 8192-entry codebook never needs an (all pixels x 8192) matrix at once. z_q carries a
    straight-through gradient to z.
    """

    def __init__(self, n_embed: int, embed_dim: int, chunk: int = 4096) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        self.chunk = chunk

    def codes(self, z: Tensor) -> Tensor:
        """Index of the nearest code for every pixel of z (B, C, h, w) -> (B, h, w) int64."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()  # (B*h*w, C)
        codebook = self.embedding.weight.float()  # (n_embed, C)
        e2 = codebook.pow(2).sum(1)  # (n_embed,)
        out = []
        for rows in flat.split(self.chunk):
            d = rows.pow(2).sum(1, keepdim=True) + e2 - 2 * (rows @ codebook.t())  # (rows, n_embed)
            out.append(d.argmin(1))
        return torch.cat(out).view(b, h, w)

    def codes_direct(self, z: Tensor) -> Tensor:
        """`codes` by the direct squared distance sum_c (z_c - e_c)^2, written to be compiled: torch.compile fuses
        it into one reduction over the codebook (the 3-wide sum unrolled) that never stores the (pixels x n_embed)
        matrix, where `codes` streams chunks of it through memory (on an H100, 0.46 ms per patch eager against
        0.05 ms compiled; the compiled decode around it fell from 2.16 to 1.74 ms: bench/RESULTS.md). Eager it
        would hold that matrix: use `codes` there. The same nearest code as `codes` except where two codes are
        equidistant to rounding (the expanded form rounds differently)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, 1, c).float()  # (B*h*w, 1, C)
        d = (flat - self.embedding.weight.float()).pow(2).sum(-1)  # (B*h*w, n_embed): fused when compiled
        return d.argmin(1).view(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codebook vectors for `codes` (B, h, w) -> (B, C, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        codes = self.codes(z)
        z_q = self.lookup(codes).to(z.dtype)
        return z + (z_q - z).detach(), codes


class VQModel(nn.Module):
    """VQ-f4 autoencoder: `encode` -> pre-quantisation latent, `decode` (quantising by default) -> image."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode(self, img: Tensor) -> Tensor:
        """Image in [-1, 1] (B, C, H, W) -> pre-quantisation latent (B, embed_dim, H/f, W/f)."""
        f = self.config.downsampling
        if img.ndim != 4 or img.shape[-1] % f or img.shape[-2] % f:
            raise ValueError(
                f"VQModel.encode: image of shape {tuple(img.shape)} needs (B, C, H, W), H, W divisible by {f}"
            )
        return self.quant_conv(self.encoder(img))

    def decode(self, latent: Tensor, quantize: bool = True) -> Tensor:
        """Latent (B, embed_dim, h, w) -> image; snaps to the nearest code first unless `quantize=False`."""
        if quantize:
            latent, _ = self.quantize(latent)
        return self.decoder(self.post_quant_conv(latent))

    def forward(self, img: Tensor, quantize: bool = True) -> Tensor:
        """Reconstruction `decode(encode(img), quantize)`."""
        return self.decode(self.encode(img), quantize)


def vq_from_official(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    prefix: str = "",
    device: str | torch.device = "cpu",
) -> VQModel:
    """Build a VQModel from official arguments and load an official state dict (strict; eval mode).

    `prefix` selects and strips a checkpoint prefix (e.g. `"first_stage_model."`). Keys and shapes are checked
    before any memory is allocated; raises `CheckpointKeyError`.
    """
    cfg = VQConfig.from_official(config)
    sd = strip_prefix(state_dict, prefix)
    return build_checked(lambda: VQModel(cfg), sd, "official VQ autoencoder", device)


__all__ = [
    "VQ_PRESETS",
    "AttnBlock",
    "Decoder",
    "Encoder",
    "ResnetBlock",
    "VQConfig",
    "VQModel",
    "VectorQuantizer",
    "vq_from_official",
]
