"""Checkpoints -> the denoiser functions the samplers of `zoomldm.diffusion` take.

    m = load_zoomldm("resources/runs/demo_he/ldm/model.safetensors", "cpu")        # unet (EMA), summarizer, vq
    ctx = context_from_store(m.summarizer, store, "5x", [0, 1, 2])                 # (3, 65, D)
    eps_fn = patch_eps_fn(m.unet, ctx, scale=1.75)                                 # eps_fn(x_t, t)

Guidance conventions (zoomldm.diffusion.guidance): patch sets use the standard form ε_u + s(ε_c − ε_u) with
s = 1.75 (official CDM-FID script, official-implementation.md §4); the joint multi-scale and SR samplers write
(1 + w) ε_c − w ε_u with w = 2 (§5.2), i.e. s = 1 + w = 3. The null condition is an all-zero context (§10.2).

CDM conditioning (§4): the CDM models the Summarizer *output* (65 x D); samples come from 200 respaced DDIM
steps (ADM spacing, η = 0, no clipping) of its x0-prediction on the cosine schedule, and are fed straight to the
UNet's cross-attention (no Summarizer).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zoomldm.data.regions import TOKEN_EPS
from zoomldm.data.pairs import pick_rows  # re-exported: dn.pick_rows
from zoomldm.diffusion import (Schedule, cfg_eps_fn, ddim_sample, eps_fn_from_x0_fn, feature_cache_model_fn,
                               item_seed, plms_sample, randn_items)
from zoomldm.diffusion.surrogate import LinearVQ
from zoomldm.models.cdm import ConditionDiT
from zoomldm.models.checkpoint import Checkpoint, load_component, read_checkpoint
from zoomldm.models.summarizer import Summarizer
from zoomldm.models.unet import UNet
from zoomldm.models.vq import VQModel

log = logging.getLogger(__name__)

ZOOMLDM_KINDS = ("zoomldm", "single-scale")
JointEpsFn = Callable[[torch.Tensor, torch.Tensor, str, "slice | None"], torch.Tensor]  # (x, t, which, index)


class CheckpointKindError(ValueError):
    """A checkpoint of another kind than the command needs (one line, naming the file)."""


def stream_seed(seed: int, *tags: int | str) -> int:
    """A base seed for one named random stream of a run (e.g. ("patches", "5x")): items of different
    streams never share noise, and item i of a stream still depends only on (seed, tags, i)."""
    return item_seed(seed, 0, "stream", *tags)


@dataclass
class Counter:
    """Sample-forwards through the UNet (a CFG pair counts 2; `unet_cached`: those that ran only the shallow
    branch on cached features, `LatentModel.cached_model_fn`) and images through the VQ decoder/encoder."""
    unet: int = 0
    vq_decode: int = 0
    vq_encode: int = 0
    unet_cached: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"unet_forwards": self.unet, "vq_decodes": self.vq_decode, "vq_encodes": self.vq_encode,
                "unet_cached_forwards": self.unet_cached}


class LatentModel:
    """What a patch LDM with a bundled VQ offers the samplers (ZoomLDM here, the Graikos baseline in
    baselines/panorama.py): sizes, the counted UNet call and the VQ decode. Needs `unet`, `vq`, `counter`."""
    unet: UNet
    vq: VQModel
    counter: Counter

    @property
    def latent_side(self) -> int:
        return self.unet.config.image_size

    @property
    def patch_px(self) -> int:
        return self.unet.config.image_size * self.vq.config.downsampling

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # set by `fast_path`: the compiled UNet.forward_caching, (x, t, context, branch) -> (eps, deep feature): one
    # graph serves plain sampling (branch 0, the feature unused) and the DeepCache full steps of branch 0
    unet_fn = None
    unet_cached_fn = None               # set by `fast_path`: the compiled UNet.forward_cached (DeepCache's shallow steps)
    vq_decode_fn = None                 # set by `fast_path`: the compiled VQ decoder (latents already quantised)
    vq_codes_fn = None                  # set by `fast_path`: the compiled search (VectorQuantizer.codes_direct)
    vq_dtype: torch.dtype | None = None  # set by `fast_path`: VQ autocast dtype (None: float32)
    static_batch = False                # set by `compile_networks(dynamic=False)`: a UNet graph per batch shape

    def _whole_unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, the deep feature of `branch`) of the whole UNet, counted: `UNet.forward_caching`, compiled or
        eager (its eps is `forward`'s, exactly)."""
        self.counter.unet += x.shape[0]
        if self.unet_fn is None:                  # a compiled function has no bool()
            return self.unet.forward_caching(x, t, context, branch)
        # one memory format for every caller: the compiled graph guards on the strides of x, and a sampler's NCHW
        # batch after a channels-last one (or the other way round) would recompile it (minutes for the paper UNet;
        # torch 2.11's dynamic-shape recompile of it hung for over 100 s in the H100 bench of 2026-11-27)
        return self.unet_fn(x.contiguous(memory_format=torch.channels_last), t, context, branch)

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.unet_fn is None:     # the module's own forward: stand-in denoisers (tests, baselines) have only that
            self.counter.unet += x.shape[0]
            return self.unet(x, t, context)
        return self._whole_unet(x, t, context, 0)[0]

    def cached_model_fn(self, every: int = 1, branch: int = 0, forecast: bool = False):
        """`model_fn` with DeepCache feature reuse (`zoomldm.diffusion.cache`): every `every`-th call runs the whole
        UNet, the calls in between only its shallow branch `branch` (`UNet.forward_cached`) on the cached deep
        feature, or with `forecast` on its first-order extrapolation from the last two whole calls. `every = 1` is
        `model_fn` itself. Stateful: one per sampling run. Counts full calls in `counter.unet` and shallow ones in
        `counter.unet_cached`."""
        if every == 1:
            return self.model_fn
        self.unet.check_cache_branch(branch)

        def shallow(x, t, context, deep):
            self.counter.unet_cached += x.shape[0]
            if self.unet_cached_fn is None:
                return self.unet.forward_cached(x, t, context, deep, branch)
            return self.unet_cached_fn(x.contiguous(memory_format=torch.channels_last), t, context, deep, branch)
        return feature_cache_model_fn(lambda x, t, context: self._whole_unet(x, t, context, branch), shallow, every,
                                      forecast)

    def _vq_autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.vq_dtype or torch.float32, enabled=self.vq_dtype is not None)

    def quantize(self, latent: torch.Tensor) -> torch.Tensor:
        """The latent snapped to its nearest codes, float32 (the codebook search `decode` starts with; no VQ pass
        is counted): the quantiser of the cut's fitted decoder (`linear_vq_for`). With the compiled search
        (`compile_networks`) batches above 1 go through it; batch 1 (the guide) stays eager."""
        with torch.autocast(latent.device.type, enabled=False):
            latent = latent.float()
            if self.vq_codes_fn is None or latent.shape[0] == 1:
                return self.vq.quantize(latent)[0]
            # one memory format for the compiled graph (it guards on strides; channels-last needs no copy to the
            # search's pixel rows), the batch dimension dynamic
            z = latent.contiguous(memory_format=torch.channels_last)
            torch._dynamo.mark_dynamic(z, 0)
            z_q = self.vq.quantize.lookup(self.vq_codes_fn(z)).float()
            return latent + (z_q - latent).detach() if latent.requires_grad else z_q   # straight-through as eager

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VQ decode with codebook quantisation (official decode_first_stage), clamped to [-1, 1]; float32 even
        inside autocast (the joint sampler takes finite differences through the VQ) unless `fast_path` set
        vq_dtype; the result is float32 either way."""
        self.counter.vq_decode += latent.shape[0]
        latent, quantize = latent.float(), True
        if self.vq_dtype is not None or self.vq_decode_fn is not None:   # the codebook search stays float32
            latent, quantize = self.quantize(latent), False
        with self._vq_autocast(latent.device):
            if self.vq_decode_fn is None or latent.shape[0] == 1:    # batch 1 (the guide): not worth a compile
                return self.vq.decode(latent, quantize=quantize).float().clamp(-1, 1)
            torch._dynamo.mark_dynamic(latent, 0)       # one graph for every batch > 1 (the samplers use many)
            return self.vq_decode_fn(latent).float().clamp(-1, 1)


@dataclass
class ZoomLDM(LatentModel):
    """The networks `sample` commands use, loaded from one checkpoint."""
    unet: UNet
    summarizer: Summarizer
    vq: VQModel
    path: Path
    kind: str
    schedule: Schedule = field(default_factory=Schedule.scaled_linear)
    counter: Counter = field(default_factory=Counter)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """VQ encode (pre-quantisation latent), float32 even inside autocast."""
        self.counter.vq_encode += image.shape[0]
        with self._vq_autocast(image.device):
            return self.vq.encode(image.float()).float()


def _kind_error(path: Path, ckpt: Checkpoint, want: str) -> CheckpointKindError:
    return CheckpointKindError(f"{path} is a {ckpt.kind} checkpoint (components: {', '.join(ckpt.components)}); "
                               f"{want}")


def load_zoomldm(ckpt_path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                 vq_path: str | Path | None = None) -> ZoomLDM:
    """UNet (its EMA copy when present and `ema`), Summarizer and VQ from a ZoomLDM or single-scale checkpoint.

    The run's `model.safetensors` bundles the VQ that encoded the store's latents (`zoomldm train`); for a
    checkpoint without one (e.g. `final.safetensors`) pass `vq_path`. Anything else (a CDM, a VQ, a Graikos
    model) raises `CheckpointKindError` in one line.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    want = ("--ckpt needs a ZoomLDM checkpoint with unet, summarizer and vq, e.g. "
            "resources/runs/<dataset>/ldm/model.safetensors")
    if ckpt.kind not in ZOOMLDM_KINDS or not {"unet", "summarizer"} <= set(ckpt.components):
        raise _kind_error(path, ckpt, want)
    name = "unet_ema" if ema and "unet_ema" in ckpt.components else "unet"
    if ema and name == "unet":
        log.info("%s has no EMA UNet; sampling with the raw weights", path)
    if vq_path is not None:
        vq_ckpt = read_checkpoint(vq_path)
        if "vq" not in vq_ckpt.components:
            raise _kind_error(Path(vq_path), vq_ckpt, "--vq needs a checkpoint with a vq component")
        vq = load_component(vq_ckpt, "vq", device)
    elif "vq" in ckpt.components:
        vq = load_component(ckpt, "vq", device)
    else:
        raise CheckpointKindError(f"{path} has no vq component: use the run's model.safetensors (it bundles the "
                                  f"VQ of the store's latents) or pass --vq")
    unet, summarizer = load_component(ckpt, name, device), load_component(ckpt, "summarizer", device)
    if unet.config.context_dim != summarizer.config.hidden_dim:
        raise CheckpointKindError(f"{path}: UNet context_dim {unet.config.context_dim} != Summarizer width "
                                  f"{summarizer.config.hidden_dim}")
    return ZoomLDM(unet, summarizer, vq, path, ckpt.kind)


def load_cdm(ckpt_path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> ConditionDiT:
    """The CDM (its EMA copy when present and `ema`) from a `zoomldm train cdm` checkpoint."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    if "cdm" not in ckpt.components:
        raise _kind_error(path, ckpt, "--cdm-ckpt needs a CDM checkpoint, e.g. "
                                      "resources/runs/<dataset>/cdm/final.safetensors")
    name = "cdm_ema" if ema and "cdm_ema" in ckpt.components else "cdm"
    return load_component(ckpt, name, device)


def check_cdm_fits(cdm: ConditionDiT, m: ZoomLDM, mag_index: int) -> None:
    if cdm.config.in_channels != m.unet.config.context_dim:
        raise CheckpointKindError(f"--cdm-ckpt models {cdm.config.in_channels}-wide contexts but the UNet of "
                                  f"{m.path} cross-attends to {m.unet.config.context_dim}-wide ones")
    if not 0 <= mag_index < cdm.config.mag_levels:
        raise ValueError(f"--cdm-ckpt knows {cdm.config.mag_levels} magnifications; index {mag_index} is outside")


def fast_path(m: LatentModel, compile: bool | str = False, vq_precision: str = "fp32",
              compile_cache: str | Path | None = None) -> LatentModel:
    """The CUDA fast path of issue #8 on a loaded model, in place: channels-last UNet and VQ, VQ passes in bf16
    (`vq_precision`) and torch.compile (`compile_networks`): `compile=True` of the UNet (one dynamic-shape graph
    for every batch size), the VQ decoder and the codebook search; `compile="static"` the same with the UNet
    compiled for each batch shape it meets (a graph per shape; on an H100 0.66 instead of 0.80 ms per
    sample-forward at batch 128, and about a minute of compile per shape instead of 4.5-5.3 for the dynamic one,
    bench/RESULTS.md); `compile="vq"` of the VQ decoder and the codebook search only (a compile of seconds instead
    of minutes; the H100 setting of issue 8's large-image rows). No-op on CPU (nothing there is faster for it).
    Results change only by the rounding of the chosen precisions."""
    if vq_precision not in ("fp32", "bf16"):
        raise ValueError(f"vq_precision must be fp32 or bf16, got {vq_precision!r}")
    if not (isinstance(compile, bool) or compile in ("vq", "static")):
        raise ValueError(f"compile must be false, true, 'static' or 'vq', got {compile!r}")
    if m.device.type != "cuda":
        return m
    m.unet.to(memory_format=torch.channels_last)
    m.vq.to(memory_format=torch.channels_last)
    m.vq_dtype = torch.bfloat16 if vq_precision == "bf16" else None
    if compile:
        compile_networks(m, compile_cache=compile_cache, unet=compile != "vq",
                         dynamic=compile != "static")
    return m


# distinct batch shapes a statically compiled UNet graph may take before torch falls back to eager (torch's default
# is 8; the samplers meet 2-4: the full batch, the last one and the guide call; the shallow branch as many again)
STATIC_SHAPES = 16


def compile_networks(m: LatentModel, backend: str = "inductor", compile_cache: str | Path | None = None,
                     unet: bool = True, vq: bool = True, dynamic: bool = True) -> None:
    """torch.compile, in place, of the UNet forward (as `UNet.forward_caching`, whose branch-0 graph also serves
    DeepCache's full steps: another `cache_branch` compiles the whole UNet once more; and `forward_cached` for the
    shallow steps, a small graph); with `dynamic` one graph for every batch size, else a graph for each batch shape
    met (up to `STATIC_SHAPES`; faster per forward, quicker to compile per shape); skipped with `unet=False`), of
    the VQ decoder after the codebook search, and of the codebook search itself in float32
    (`VectorQuantizer.codes_direct`: one fused reduction instead of streaming the distance matrix; both VQ graphs
    skipped with `vq=False`). `LatentModel` marks the VQ's batch dimension dynamic: one graph for every batch > 1;
    batch 1, the guide, stays eager: a 1-of-257 share of the decodes is not worth a second compile. Compiling
    happens at the first call of each (the paper UNet: 270-320 s on an H100, 89 s from the kernel cache, about a
    minute per shape static; the VQ decoder: 17-25 s); `compile_cache` points the kernel cache
    (TORCHINDUCTOR_CACHE_DIR, unless set in the environment) at a directory that outlives the job, so later jobs
    reuse the kernels."""
    if compile_cache is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = Path(compile_cache).resolve()
        try:                                 # now, not deep inside the first compile after minutes of work
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"sample.compile_cache {compile_cache}: cannot create {path} ({e.strerror})") from e
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    if unet:   # the whole UNet as forward_caching: the same graph for plain and DeepCache sampling (branch 0);
        # the shallow branch compiles lazily, at the first cached step (a small graph)
        if not dynamic:
            dynamo = torch._dynamo.config          # (named cache_size_limit before torch 2.6)
            name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, name, max(getattr(dynamo, name), STATIC_SHAPES))
        m.unet_fn = torch.compile(m.unet.forward_caching, dynamic=dynamic, backend=backend)
        m.unet_cached_fn = torch.compile(m.unet.forward_cached, dynamic=dynamic, backend=backend)
        m.static_batch = not dynamic
    if vq:
        vq_model = m.vq
        m.vq_decode_fn = torch.compile(lambda z: vq_model.decode(z, quantize=False), backend=backend)
        m.vq_codes_fn = torch.compile(vq_model.quantize.codes_direct, backend=backend)


def _store_latents(store):
    """The base-magnification table of the store when it holds latents, else None."""
    table = store.table(store.magnifications[0].name) if store is not None else None
    return table if table is not None and table.has("latents") else None


@torch.no_grad()
def linear_vq_for(m: ZoomLDM, store=None, n: int = 64, seed: int = 0):
    """The fitted linear VQ of the `linear` joint constraint (zoomldm.diffusion.surrogate) for model m: fitted
    on n base-magnification latents of the store (a fixed random pick), or, without a store or its latents, on
    latents of random codebook entries (a weaker fit; logged). The decoder part (5 x 5 latent taps) is fitted
    on the latents snapped by `m.quantize`, which it keeps for `decode_quantized` (cut.decode_every)."""
    from zoomldm.diffusion.surrogate import fit_linear_vq
    h, gen = m.latent_side, torch.Generator().manual_seed(seed)
    table = _store_latents(store)
    if table is not None:
        rows = torch.randperm(len(table), generator=gen)[:n].tolist()
        latents = torch.from_numpy(np.stack([np.asarray(table.get("latents", r)) for r in rows])).float()
        if latents.shape[-1] != h:
            raise ValueError(f"{store.root}: its latents are {latents.shape[-1]}x{latents.shape[-1]}, the model's "
                             f"{h}x{h}")
    else:
        log.warning("linear constraint: no store latents, fitting the linear VQ on random codebook latents")
        codebook = m.vq.quantize.embedding.weight.detach().float().cpu()          # (n_embed, c)
        codes = torch.randint(0, codebook.shape[0], (n, h, h), generator=gen)
        latents = codebook[codes].permute(0, 3, 1, 2).contiguous()               # (n, c, h, w)
    # the encoder's finite differences need float32; the compiled decoder is left out (it was traced under the
    # samplers' bf16 autocast: a float32 call recompiles it, 25 s on an H100, for a one-off 64-latent decode)
    vq_dtype, vq_decode_fn, m.vq_dtype, m.vq_decode_fn = m.vq_dtype, m.vq_decode_fn, None, None
    try:
        return fit_linear_vq(latents.to(m.device), m.decode, m.encode, dec_taps=5, quantize=m.quantize)
    finally:
        m.vq_dtype, m.vq_decode_fn = vq_dtype, vq_decode_fn


# ---------------------------------------------------------------------------------------------------------
# A fit kept in a file: the workflow fits once per run (`zoomldm sample fit-linear`) and every large-image job
# loads it (`sample large --linear-vq`) instead of refitting, which costs each job more than sampling a 1024²
# image on an H100 (bench/RESULTS.md).

_META_KEY = "zoomldm-bench-linear-vq"


def save_linear_vq(lin: LinearVQ, path: str | Path, meta: dict) -> Path:
    """Write the fitted maps, ``f``, ``fit_error`` and the caller's ``meta`` (JSON-able: e.g. which VQ it was
    fitted for) to a safetensors file, atomically (`training.loop.atomic_write`)."""
    from safetensors.torch import save_file

    from zoomldm.training.loop import atomic_write
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(lin, name).detach().float().cpu().contiguous()
               for name in ("dec_weight", "dec_bias", "enc_weight", "enc_bias")}
    doc = json.dumps({"f": lin.f, "fit_error": lin.fit_error, "meta": meta}, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_META_KEY: doc}))
    return path


def load_linear_vq(path: str | Path, device: torch.device | str = "cpu",
                   quantize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[LinearVQ, dict]:
    """(LinearVQ on ``device`` with ``quantize`` attached, the ``meta`` it was saved with); a file that is not a
    saved fit is a one-line ValueError."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"linear VQ file {path} does not exist (write it with `zoomldm sample fit-linear`)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            doc = json.loads((fh.metadata() or {})[_META_KEY])
            t = {name: fh.get_tensor(name) for name in ("dec_weight", "dec_bias", "enc_weight", "enc_bias")}
    except Exception as e:  # noqa: BLE001  (a foreign or truncated file: say so in one line)
        raise ValueError(f"{path} is not a linear VQ fit written by `zoomldm sample fit-linear` "
                         f"({type(e).__name__}: {e})") from None
    lin = LinearVQ(t["dec_weight"], t["dec_bias"], t["enc_weight"], t["enc_bias"], int(doc["f"]),
                   dict(doc["fit_error"]), quantize)
    return lin.to(device), dict(doc["meta"])


def vq_fingerprint(vq: VQModel) -> str:
    """A short hash of every weight of the VQ (float32 bytes, in name order): which VQ a saved fit belongs to."""
    digest = hashlib.sha256()
    for name, t in sorted(vq.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_linear_vq_for(m: ZoomLDM, path: str | Path, store=None, n: int = 64, seed: int = 0):
    """`linear_vq_for`, written to `path` with what it was fitted for (the VQ's fingerprint, the latents' source)
    so that every large-image job can load it (`load_linear_vq_for`) instead of refitting. Returns the fit."""
    lin = linear_vq_for(m, store, n, seed)
    source = f"store {store.root}" if _store_latents(store) is not None else "random codebook latents"
    save_linear_vq(lin, path, {"vq": vq_fingerprint(m.vq), "latents": source, "n": n, "seed": seed,
                               "dec_taps": int(lin.dec_weight.shape[-1])})
    return lin


def load_linear_vq_for(m: ZoomLDM, path: str | Path):
    """The fit `save_linear_vq_for` wrote, on m's device with m's quantiser; one-line ValueError when it was
    fitted for another VQ."""
    lin, meta = load_linear_vq(path, m.device, quantize=m.quantize)
    want = vq_fingerprint(m.vq)
    if meta.get("vq") != want:
        raise ValueError(f"{path} was fitted for another VQ (fingerprint {meta.get('vq')}, this model's {want}): "
                         f"refit it with `zoomldm sample fit-linear`")
    return lin


# UNet autocast dtype per task on CUDA for precision "auto". Patch sets: bf16. Joint sampling: fp16, the
# official choice: its finite differences (x̂0(x_t + h·e) − x̂0(x_t))/h with h = 0.005 need more mantissa than
# bf16's 8 bits (a bf16 ε is off by ~0.4 %, i.e. ~0.8 of the difference it should resolve). SR: fp32, because the
# condition inversion back-propagates without a gradient scaler. The VQ always runs in fp32 (`ZoomLDM.decode`).
AUTO_DTYPE = {"patches": torch.bfloat16, "joint": torch.float16, "sr": None}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def amp_dtype(device: torch.device | str, precision: str = "auto", task: str = "patches") -> torch.dtype | None:
    """The UNet autocast dtype (None: float32). CPU always runs float32 (CPU autocast is slow)."""
    if torch.device(device).type != "cuda":
        return None
    if precision == "auto":
        return AUTO_DTYPE[task]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return PRECISIONS[precision]


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "auto", task: str = "patches"):
    """torch.autocast with `amp_dtype(device, precision, task)` (disabled for float32)."""
    dtype = amp_dtype(device, precision, task)
    with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


# ---------------------------------------------------------------------------------------------------------
# Conditioning

def standardize(grids: torch.Tensor) -> torch.Tensor:
    """Per-token standardisation over channels (dim 1), as `regions.standardize_tokens` / the dataset."""
    grids = grids.float()
    mean = grids.mean(dim=1, keepdim=True)
    std = grids.std(dim=1, keepdim=True, unbiased=True)
    return (grids - mean) / (std + TOKEN_EPS)


@torch.no_grad()
def context_from_grids(summarizer: Summarizer, grids: torch.Tensor | np.ndarray, mag_index: int,
                       batch: int = 256) -> torch.Tensor:
    """Raw SSL grids (N, C, g, g) of one magnification -> standardised -> Summarizer -> (N, 65, D)."""
    device = next(summarizer.parameters()).device
    grids = torch.as_tensor(np.asarray(grids) if isinstance(grids, np.ndarray) else grids)
    out = []
    for i in range(0, len(grids), batch):
        g = standardize(grids[i:i + batch].to(device))
        mag = torch.full((len(g),), mag_index, dtype=torch.long, device=device)
        out.append(summarizer(g, mag).float())
    return torch.cat(out)


@torch.no_grad()
def context_from_store(summarizer: Summarizer, store, mag: str | int, indices: Sequence[int],
                       batch: int = 256) -> torch.Tensor:
    """Contexts (N, 65, D) of store regions `indices` (rows of magnification `mag`), standardised exactly as
    in training (`RegionDataset`)."""
    from zoomldm.data.dataset import RegionDataset
    table = store.table(mag)
    ds = RegionDataset(store, [table.magnification.name])
    device = next(summarizer.parameters()).device
    out = []
    for i in range(0, len(indices), batch):
        b = ds.__getitems__(list(indices[i:i + batch]))
        g = b["grid_side"][0].item()  # one magnification: one side
        out.append(summarizer(b["grid"][:, :, :g, :g].to(device), b["mag"].to(device)).float())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# Guided denoisers

def patch_eps_fn(m: ZoomLDM, context: torch.Tensor, scale: float = 1.75, cache_every: int = 1,
                 cache_branch: int = 0, cache_forecast: bool = False):
    """eps_fn(x_t, t) with CFG in the standard form s (official CDM-FID PLMS sampler: s = 1.75); with
    `cache_every` > 1 the UNet reuses its deep features between full evaluations, extrapolated with
    `cache_forecast` (`LatentModel.cached_model_fn`): one eps_fn per sampling run."""
    return cfg_eps_fn(m.cached_model_fn(cache_every, cache_branch, cache_forecast), context, None, scale)


def joint_eps_fn(m: ZoomLDM, guide_ctx: torch.Tensor | None, patch_ctx: torch.Tensor,
                 w: float = 2.0) -> JointEpsFn:
    """eps_fn(x, t, which, index) for `joint_multiscale_sample`: which = "guide" (context `guide_ctx`, None for
    a fixed guide image) or "patches" (rows `index` of `patch_ctx`); CFG (1 + w) ε_c − w ε_u inside (§5.2)."""
    from zoomldm.diffusion.joint import cfg_joint_eps_fn
    return cfg_joint_eps_fn(m.model_fn, guide_ctx, patch_ctx, w)


@torch.no_grad()
def sample_cdm_contexts(cdm: ConditionDiT, n: int, mag: int, seed: int, steps: int = 200,
                        indices: Sequence[int] | None = None, batch_size: int = 64,
                        progress: bool = False) -> torch.Tensor:
    """n Summarizer-space contexts (n, 65, D) at magnification index `mag` from the CDM (official
    `cdm_measure_fid.py`: DDIM over the x0-prediction, cosine schedule, ADM respacing, η = 0, no clipping).

    Item k's starting noise is item `indices[k]` (default k) of stream (seed, "cdm"), so results depend on
    neither the batch size nor the other items.
    """
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(indices) != n:
        raise ValueError(f"sample_cdm_contexts: {len(indices)} indices for n={n}")
    cfg = cdm.config
    device = next(cdm.parameters()).device
    schedule = Schedule.cosine()
    out = []
    for i in range(0, n, batch_size):
        idx = indices[i:i + batch_size]
        labels = torch.full((len(idx),), mag, dtype=torch.long, device=device)

        def x0_fn(x, t, labels=labels):
            return cdm(x, t, labels)[:, :cfg.in_channels].float()   # mean channels; variance is unused by DDIM

        x_T = randn_items(stream_seed(seed, "cdm"), idx, (cfg.in_channels, cfg.num_tokens), device)  # (b, D, 65)
        x0 = ddim_sample(eps_fn_from_x0_fn(x0_fn, schedule), x_T, schedule, steps, eta=0.0,
                         progress=progress, spacing="adm")
        out.append(x0.transpose(1, 2).contiguous())               # (b, 65, D): fed straight to the UNet
    return torch.cat(out)


@torch.no_grad()
def sample_patch_latents(m: ZoomLDM, context: torch.Tensor, indices: Sequence[int], seed: int,
                         steps: int = 50, scale: float = 1.75, sampler: str = "plms", cache_every: int = 1,
                         cache_branch: int = 0, cache_forecast: bool = False,
                         pad_to: int | None = None) -> torch.Tensor:
    """Latents (N, 3, h, h) of items `indices`: x_T from item i of stream `seed`, then PLMS (default) or
    DDIM η = 0 with CFG s = `scale` (standard form), the UNet's deep features reused (or, with `cache_forecast`,
    extrapolated) between every `cache_every`-th evaluation (1: off; `patch_eps_fn`). `m`: a ZoomLDM or any
    `LatentModel` with a `schedule` (the Graikos patch LDM). `pad_to`: a shorter batch runs padded to that many
    items (copies of its last one, dropped after), so that a UNet compiled per batch shape (`static_batch`) meets
    one shape, not one more for a shard's last batch (a minute of compile for the paper UNet, against a few
    items' sampling); the items' latents are the unpadded ones, up to the rounding of another batch size."""
    c = m.unet.config
    n = len(indices)
    x_T = randn_items(seed, indices, (c.in_channels, c.image_size, c.image_size), m.device)
    context = context.to(m.device)
    if pad_to is not None and 0 < n < pad_to:
        x_T = torch.cat([x_T, x_T[-1:].expand(pad_to - n, *x_T.shape[1:])])
        context = torch.cat([context, context[-1:].expand(pad_to - n, *context.shape[1:])])
    eps_fn = patch_eps_fn(m, context, scale, cache_every, cache_branch, cache_forecast)
    if sampler == "plms":
        return plms_sample(eps_fn, x_T, m.schedule, steps)[:n]
    return ddim_sample(eps_fn, x_T, m.schedule, steps)[:n]


# ---------------------------------------------------------------------------------------------------------
# Real conditioning from the store

@dataclass
class LargeRegion:
    """A real region of the guide magnification and the raw SSL embeddings of the base tiles it covers."""
    row: int                  # row in the guide magnification's table
    slide: str
    row0: int                 # top-left base tile of the region
    col0: int
    x: int                    # top-left in slide pixels
    y: int
    guide_grid: np.ndarray    # (C, gs, gs) raw pooled grid of the region
    base_grids: np.ndarray    # (g*g, C, 1, 1) raw base-tile embeddings, row-major over the region
    from_tiles: int           # how many of them came from the part's tiles.npy (tile not kept as a 20x region)
    image: np.ndarray | None  # (P, P, 3) uint8 region image, when the store keeps images

    def source(self) -> dict:
        return {"slide": self.slide, "row0": self.row0, "col0": self.col0, "x": self.x, "y": self.y,
                "store_row": self.row, "base_from_tiles": self.from_tiles}


class RegionLookup:
    """Regions of one guide magnification with their base-tile embeddings.

    A base tile's 1 x 1 conditioning is the store's base-magnification grid of that tile, found through the
    base manifest (slide, row0, col0). Tiles not kept as base regions (their own mask fraction was below the
    threshold although the larger region's was not) are read from the tile embeddings saved in the slide's
    part, `<store_root>/<name>.parts/<slide>/tiles.npy` ((rows, cols, C) float16, every tile of a kept region
    embedded): the same numbers, since a base region's grid is its tile's embedding.
    """

    def __init__(self, store, guide_mag, parts_root: Path | None = None):
        from zoomldm import mags
        self.store = store
        self.guide = store.table(guide_mag)
        self.base = store.table(mags.ladder(store.ladder)[0].name)
        self.g = self.guide.magnification.tiles_per_side
        self.parts_root = Path(parts_root) if parts_root else store.root.with_name(store.root.name + ".parts")
        m = self.base.manifest
        self._base_rows = {(s, int(r), int(c)): i for i, (s, r, c) in
                           enumerate(zip(m["slide"], m["row0"], m["col0"]))}
        self._tiles: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.guide)

    def _tile(self, slide: str, r: int, c: int) -> np.ndarray:
        if slide not in self._tiles:
            path = self.parts_root / slide / "tiles.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; base tile ({r}, {c}) of slide {slide} is not a base "
                                        f"region of the store, so its embedding must come from the part")
            self._tiles[slide] = np.load(path, mmap_mode="r")
        tile = np.asarray(self._tiles[slide][r, c], dtype=np.float32)
        if not np.any(tile):
            raise ValueError(f"{self.parts_root / slide / 'tiles.npy'}: tile ({r}, {c}) was never embedded")
        return tile

    def region(self, row: int) -> LargeRegion:
        rec = self.guide.manifest.iloc[int(row)]
        slide, r0, c0 = str(rec["slide"]), int(rec["row0"]), int(rec["col0"])
        base, from_tiles = [], 0
        for r in range(r0, r0 + self.g):
            for c in range(c0, c0 + self.g):
                i = self._base_rows.get((slide, r, c))
                if i is None:
                    base.append(self._tile(slide, r, c))
                    from_tiles += 1
                else:
                    base.append(np.asarray(self.base.get("grids", i), dtype=np.float32).reshape(-1))
        image = np.asarray(self.guide.get("images", int(row))) if self.guide.has("images") else None
        return LargeRegion(int(row), slide, r0, c0, int(rec["x"]), int(rec["y"]),
                           np.asarray(self.guide.get("grids", int(row)), dtype=np.float32),
                           np.stack(base)[:, :, None, None], from_tiles, image)
