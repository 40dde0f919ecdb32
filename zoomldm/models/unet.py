"""Cross-attention UNet denoiser: the official `openaimodel.UNetModel` topology (reference report §1.1).

Parameter names equal the official ones (`time_embed`, `input_blocks.N.M`, `middle_block`, `output_blocks`,
`out`), so an official state dict (the keys under `model.diffusion_model.`) loads strictly; see
`unet_from_official`.

    unet = UNet(UNET_PRESETS["small"])
    eps = unet(x_t, t, context)                                   # (B, 3, h, w)
    eps, feats = unet(x_t, t, context, return_intermediates=True)
    # feats: {"middle_block": ..., "output_blocks.0": ..., ..., "output_blocks.11": ...}

Only the ZoomLDM configuration family is supported: spatial transformers everywhere attention is used, learned
conv resampling, no scale-shift norm, no class labels, 2-D. `from_official` rejects anything else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoomldm.models.attention import SpatialTransformer, attention_heads, zero_module
from zoomldm.models.errors import build_checked, strip_prefix

# Official arguments that are accepted with only these values (anything else is a different architecture).
_OFFICIAL_FIXED: dict[str, tuple[Any, ...]] = {
    "use_spatial_transformer": (True,),
    "conv_resample": (True,),
    "dims": (2,),
    "num_classes": (None,),
    "use_scale_shift_norm": (False,),
    "resblock_updown": (False,),
    "use_linear_in_transformer": (False,),
    "disable_self_attentions": (None,),
    "num_attention_blocks": (None,),
    "disable_middle_self_attn": (False,),
    "n_embed": (None,),
    "adm_in_channels": (None,),
    "use_bf16": (False, True),
    "use_fp16": (False, True),  # the official model runs under autocast; we leave precision to the caller
    "legacy": (False, True),  # same head split either way for spatial transformers (see attention_heads)
}
# Arguments with no effect on our module (weights init/loading or attention types we never build).
_OFFICIAL_IGNORED = ("ckpt_path", "ignore_keys", "num_heads_upsample", "use_new_attention_order")
_OFFICIAL_RENAMED = {"use_checkpoint": "gradient_checkpointing"}


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoiser. Field names follow the official `UNetModel` arguments."""

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 5)
    num_res_blocks: int = 2
    # Downsampling factors ("ds") whose blocks get a SpatialTransformer (the middle block always has one).
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    # With num_head_channels == -1, heads per transformer: 1 => head dim = full width (official legacy).
    num_heads: int = 1
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 512
    dropout: float = 0.0
    # Latent side the model is trained at; informational (the network is fully convolutional).
    image_size: int = 64
    # Official `use_checkpoint`: activation checkpointing per block, in training mode only.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        widths = [self.model_channels * m for m in self.channel_mult]
        if not self.channel_mult or any(m < 1 for m in self.channel_mult) or self.num_res_blocks < 1:
            raise ValueError(
                f"UNetConfig: bad channel_mult {self.channel_mult} / num_res_blocks {self.num_res_blocks}"
            )
        if any(w % 32 for w in widths):
            raise ValueError(
                f"UNetConfig: widths {widths} must be multiples of 32 (GroupNorm with 32 groups)"
            )
        for level, w in enumerate(widths):
            if 2**level in self.attention_resolutions:
                attention_heads(w, self.num_heads, self.num_head_channels)
        levels = {2**i for i in range(len(widths))}
        if not set(self.attention_resolutions) <= levels:
            raise ValueError(
                f"UNetConfig: attention_resolutions {self.attention_resolutions} must be downsampling "
                f"factors of the UNet levels {sorted(levels)}"
            )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsampling(self) -> int:
        """Total downsampling factor; latent sides must be divisible by it."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        """Map official `UNetModel` constructor arguments (YAML `unet_config.params`) to a UNetConfig."""
        ours = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in cfg.items():
            if key in _OFFICIAL_FIXED:
                if value not in _OFFICIAL_FIXED[key]:
                    raise ValueError(
                        f"official UNet config: unsupported {key}={value!r} (allowed: {_OFFICIAL_FIXED[key]})"
                    )
            elif key in _OFFICIAL_IGNORED:
                continue
            elif key in _OFFICIAL_RENAMED:
                kwargs[_OFFICIAL_RENAMED[key]] = bool(value)
            elif key in ours and key != "gradient_checkpointing":
                kwargs[key] = value
            else:
                raise ValueError(f"official UNet config: unknown argument {key!r}")
        required = (
            "in_channels",
            "out_channels",
            "model_channels",
            "num_res_blocks",
            "attention_resolutions",
        )
        missing = [k for k in (*required, "context_dim") if kwargs.get(k) is None]
        if missing:  # context_dim: ZoomLDM always cross-attends to the Summarizer tokens
            raise ValueError(f"official UNet config: missing required argument(s) {missing}")
        # Omitted arguments take the official constructor defaults, not our paper preset's.
        kwargs.setdefault("channel_mult", (1, 2, 4, 8))
        kwargs.setdefault("num_heads", -1)
        if kwargs["num_heads"] == -1 and kwargs.get("num_head_channels", -1) == -1:
            raise ValueError("official UNet config: set num_heads or num_head_channels")
        nrb = kwargs.get("num_res_blocks", cls.num_res_blocks)
        if isinstance(nrb, (list, tuple)):
            if len(set(nrb)) != 1:
                raise ValueError(f"official UNet config: per-level num_res_blocks {nrb} is not supported")
            kwargs["num_res_blocks"] = nrb[0]
        for key in ("channel_mult", "attention_resolutions"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)


UNET_PRESETS: dict[str, UNetConfig] = {
    # Official configs/zoomldm_brca.yaml (400.9 M parameters).
    "paper": UNetConfig(),
    # Same topology (4 levels, 2 res blocks, depth-1 single-head transformers at ds 2/4/8 and the middle) for
    # CPU runs on 64-px images: with 16x16 latents attention runs at 8x8, 4x4, 2x2 only. 2.9 M parameters.
    "small": UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), context_dim=128, image_size=16),
}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32); half-precision inputs are normalised in float32 (official `normalization`)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)  # eps 1e-5 (the SpatialTransformer norm uses 1e-6)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
            return y.to(x.dtype)
        return super().forward(x)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half), i < half.

    Cosines first, as the official `timestep_embedding` (the fixture pins this); zero-padded for odd `dim`.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected timestep embedding, GroupNorm-SiLU-dropout-zero-init conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Learned 3x3 stride-2 convolution (official `Downsample`, `conv_resample=True`)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (official `Upsample`)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that gives ResBlocks the timestep embedding and SpatialTransformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ε-prediction UNet with cross-attention to the conditioning tokens (official `UNetModel`)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        emb_dim = c.time_embed_dim

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, c.dropout)

        def attn(ch: int) -> SpatialTransformer:
            heads, dim_head = attention_heads(ch, c.num_heads, c.num_head_channels)
            return SpatialTransformer(ch, heads, dim_head, c.transformer_depth, c.context_dim, c.dropout)

        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        # Encoder: per level `num_res_blocks` x (ResBlock [+ SpatialTransformer]), then a Downsample except at
        # the last level. Every block's output is kept for a skip connection.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
        )
        skip_channels = [c.model_channels]
        ch, ds = c.model_channels, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        # The middle block always has a SpatialTransformer.
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        # Decoder: per level `num_res_blocks + 1` x (ResBlock on [h, skip] [+ SpatialTransformer]), the last
        # one followed by an Upsample except at the top level.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1))
        )

    @property
    def intermediate_names(self) -> list[str]:
        """Keys of the activations returned with `return_intermediates=True`, in computation order."""
        return ["middle_block"] + [f"output_blocks.{i}" for i in range(len(self.output_blocks))]

    def _block(self, block: TimestepEmbedSequential, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """Shape checks with one-line errors; returns the timesteps broadcast to the batch."""
        c = self.config
        if x.ndim != 4 or x.shape[-1] % c.downsampling or x.shape[-2] % c.downsampling:
            raise ValueError(
                f"UNet: input of shape {tuple(x.shape)} needs (B, C, H, W), H and W divisible by "
                f"{c.downsampling}"
            )
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"UNet: context of shape {tuple(context.shape)} needs (B, M, {c.context_dim})")
        return timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps

    def _embed(self, timesteps: Tensor) -> Tensor:
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(self.time_embed[0].weight.dtype)
        return self.time_embed(t_emb)  # (B, 4*model_channels)

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor, return_intermediates: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Predict the noise ε of `x` (B, in_channels, H, W) at `timesteps` (B,) or () given `context`
        (B, M, context_dim).

        With `return_intermediates=True` also return `{name: activation}` for `intermediate_names`: the
        middle-block output and every output-block output (the official ZoomLDM hook, reference §1.1;
        used for MIL features).
        """
        feats: dict[str, Tensor] | None = {} if return_intermediates else None
        eps, _ = self._whole(x, timesteps, context, feats)
        return (eps, feats) if return_intermediates else eps

    def _whole(
        self, x: Tensor, timesteps: Tensor, context: Tensor, feats: dict[str, Tensor] | None = None, keep: int = -1
    ) -> tuple[Tensor, Tensor | None]:
        """ε of the whole network, and the input of output block `keep` (None for -1); `feats` collects the
        middle-block and output-block activations when given."""
        timesteps = self._check_inputs(x, timesteps, context)
        emb = self._embed(timesteps)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._block(block, h, emb, context)
            skips.append(h)
        h = self._block(self.middle_block, h, emb, context)
        if feats is not None:
            feats["middle_block"] = h
        kept = None
        for i, block in enumerate(self.output_blocks):
            if i == keep:
                kept = h
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb, context)
            if feats is not None:
                feats[f"output_blocks.{i}"] = h
        return self.out(h).to(x.dtype), kept

    # Feature caching (DeepCache, Ma et al., CVPR 2024, arXiv 2312.00858): the deep features entering the last
    # `branch + 1` output blocks change slowly between adjacent sampler steps, so a sampler may compute them once
    # (`forward_caching`) and on the next steps run only the shallow branch, input blocks 0..branch and the last
    # branch + 1 output blocks, on the cached feature (`forward_cached`). The paper UNet's branch 0 is 4.2% of a
    # full forward's FLOPs (bench/RESULTS.md).

    @property
    def max_cache_branch(self) -> int:
        """The deepest shallow branch that stays at the top level (full resolution): `num_res_blocks`."""
        return self.config.num_res_blocks

    def check_cache_branch(self, branch: int) -> None:
        if not 0 <= branch <= self.max_cache_branch:
            raise ValueError(
                f"UNet: cache branch {branch} outside 0..{self.max_cache_branch} (num_res_blocks) of this model"
            )

    def forward_caching(self, x: Tensor, timesteps: Tensor, context: Tensor, branch: int = 0) -> tuple[Tensor, Tensor]:
        """`forward(x, timesteps, context)` and the feature `forward_cached` reuses: the input of output block
        `len(output_blocks) - 1 - branch` before its skip concatenation, (B, C, H, W) at full resolution."""
        self.check_cache_branch(branch)
        return self._whole(x, timesteps, context, keep=len(self.output_blocks) - 1 - branch)

    def forward_cached(self, x: Tensor, timesteps: Tensor, context: Tensor, deep: Tensor, branch: int = 0) -> Tensor:
        """ε from the shallow branch only: input blocks 0..branch on `x`, then the last `branch + 1` output blocks
        starting from `deep` (from `forward_caching` with the same branch, at an earlier timestep). Equals
        `forward` exactly when `deep` was computed on the same inputs."""
        self.check_cache_branch(branch)
        timesteps = self._check_inputs(x, timesteps, context)
        if deep.ndim != 4 or deep.shape[0] != x.shape[0] or deep.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"UNet: cached feature of shape {tuple(deep.shape)} does not fit input {tuple(x.shape)}")
        emb = self._embed(timesteps)
        skips = []
        h = x
        for block in self.input_blocks[: branch + 1]:
            h = self._block(block, h, emb, context)
            skips.append(h)
        h = deep
        for block in self.output_blocks[len(self.output_blocks) - 1 - branch:]:
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)


def unet_from_official(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    prefix: str = "",
    device: str | torch.device = "cpu",
) -> UNet:
    """Build a UNet from official constructor arguments and load an official state dict (strict; eval mode).

    `prefix` selects and strips a checkpoint prefix (e.g. `"model.diffusion_model."` for a full
    LatentDiffusion checkpoint). Keys and shapes are checked before any memory is allocated; raises
    `CheckpointKeyError`.
    """
    cfg = UNetConfig.from_official(config)
    sd = strip_prefix(state_dict, prefix)
    return build_checked(lambda: UNet(cfg), sd, "official UNet", device)


__all__ = [
    "UNET_PRESETS",
    "Downsample",
    "GroupNorm32",
    "ResBlock",
    "TimestepEmbedSequential",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
    "unet_from_official",
]
