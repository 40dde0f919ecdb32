"""Every GPU number of issues 3, 4, 5 and 8 in one command, one table (run it on a lent H100/H200):

    PYTHONUNBUFFERED=1 python bench/run_all.py --out $OUT --no-compile   # paper preset, random weights, ~6 min
    PYTHONUNBUFFERED=1 python bench/run_all.py --out $OUT                # + the compiled UNet and VQ decoder
    python bench/run_all.py --smoke                                     # CPU plumbing check (small preset)
    python bench/run_all.py --only VQ cut                               # sections in the order named (repeats ok)

Sections (default order): "UNet eager", cut, "UNet compile", VQ, patches, large, diag, profile, training; `--only`
runs the named ones in the order it names them, and also runs the opt-in "UNet compile static" (the UNet compiled
per batch shape, `sample.compile: static`; the later sections sample with it). "cut" times the cut's paper
setting (1 real decode in every 3 steps) at 1024² and 4096² on the networks compiled so far. Without --no-compile,
"UNet compile" compiles the UNet (255-320 s on an H100) and VQ compiles the decoder (~17-25 s); every later section
then samples with them (rows say "compiled"). The issue-8 rows on one H100 (2026-11-27, eighth session;
bench/RESULTS.md), run A (~8 min: the VQ and the cut's rows, patch sampling without and with DeepCache on the eager
UNet, then on the compiled one) and, on the same warm machine, run B (~3 min: the cut's rows on the eager and then
on the compiled UNet, compiled from run A's kernel cache):

    python bench/run_all.py --out $OUT --only VQ cut patches "UNet compile" patches --budget 500
    python bench/run_all.py --out $OUT --only VQ cut "UNet compile" cut --budget 310

The tenth session's (2026-11-27, one H100; bench/RESULTS.md): the operator table of one 1024² image of the cut
with the GPU's busy time against the wall time, patch sampling with DeepCache's forecast feature, the UNet compiled
for one batch shape (0.66 against the dynamic graph's 0.80 ms per sample-forward), then the compiled patch rows:

    python bench/run_all.py --out $OUT --only VQ cut profile patches "UNet compile static" --budget 480
    python bench/run_all.py --out $OUT --only "UNet compile" patches --budget 470

Not run on a GPU yet (~9 min; timeout ~590 s): the eager UNet in NCHW against channels-last (the profile's
copies), and patch sampling and the cut on the UNet compiled per batch shape (`sample.compile: static`; the first
`cut` compiles the 4096² image's two batch shapes inside its timing, the second is warm):

    python bench/run_all.py --out $OUT --only "UNet eager" VQ "UNet compile static" patches cut cut --budget 530

Rows: ms per UNet sample-forward at batch 34 and 128 (bf16 autocast; eager channels-last and NCHW; torch.compile
with one dynamic-shape graph, and with a graph per batch shape);
ms per VQ decode of one patch (fp32, bf16, compiled bf16) and of its codebook search alone; patch images/s at
50 DDIM steps + CFG (batch 64, bf16 VQ decode), without and with DeepCache feature reuse
(`sample.patches.cache_every`; at N = 5 also with the forecast, `cache_forecast`), with the share of the UNet
FLOPs each runs; seconds per 1024² and 4096² image for the reference joint algorithm and for the linear cut
with the settings of `sample.large.cut` (the real VQ decode in the residual only in every 3rd of the 20 outer
steps, as the paper configs' `decode_every`; in all of them; and with the constraint on the first 14 of 20 only),
with their UNet sample-forwards and VQ passes; training samples/s (UNet + Summarizer, AdamW, bf16, batch 64).
Random weights: time does not depend on them.

The reference algorithm is timed on its first `--ref-steps` outer steps of a 1024² image and scaled to 20
(every outer step does the same work), and its 4096² time is that per-patch cost × 257/17 (the work is linear
in the patches); those rows say "extrapolated". The cut runs whole images. Each section checks the time
budget (`--budget`, seconds) and is skipped, with a row saying so, when it would not fit. Results go to
OUT/bench.json after every section (nothing lost if the run is cut short) and the table to OUT/table.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_large import build
from unet_forward import PAPER_GFLOP, time_forward

from zoomldm.config import LinearCutConfig
from zoomldm.diffusion import ddim_sample, randn_items, step_noise_fn
from zoomldm.diffusion.blend import decode_large, patch_windows
from zoomldm.diffusion.blend_fast import half_stride
from zoomldm.diffusion.joint import assemble
from zoomldm.diffusion.joint_fast import FastJointConfig, joint_sample
from zoomldm.models.summarizer import SUMMARIZER_PRESETS
from zoomldm.sampling import denoisers as dn

ROWS: list[dict] = []
SECTIONS = ("UNet eager", "cut", "UNet compile", "VQ", "patches", "large", "diag", "profile", "training",
            "UNet compile static")
OPT_IN = ("UNet compile static",)   # sections only `--only` runs


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def ms_per_patch(fn, batch: int, device, reps: int = 3, warm: bool = True) -> float:
    """Milliseconds per patch of `fn()` decoding `batch` patches: one untimed call (unless `warm`: already
    done), then `reps` timed ones."""
    if warm:
        fn()
    _, s = timed(lambda: [fn() for _ in range(reps)], device)
    return s / (reps * batch) * 1e3


def nets_label(m) -> str:
    """The networks a sampling section runs: eager or compiled (dynamic-shape or static) UNet, eager or compiled VQ."""
    unet = "eager UNet" if m.unet_fn is None else "static-compiled UNet" if m.static_batch else "compiled UNet"
    return unet + (" + compiled VQ" if m.vq_decode_fn is not None else ", eager VQ")


def row(section: str, setting: str, value: str, note: str = "", out: Path | None = None, **extra) -> None:
    ROWS.append(dict(section=section, setting=setting, value=value, note=note, **extra))
    print(f"| {section} | {setting} | {value} | {note} |", flush=True)
    if out is not None:
        (out / "bench.json").write_text(json.dumps(ROWS, indent=1))


# ------------------------------------------------------------------------------------------------ sections
def unet_rows(m, device, batches, iters, out, compiled, mode="compile"):
    """Eager rows (channels-last, as the samplers run it, and NCHW: does eager GroupNorm's layout copy of
    channels-last activations cost more than channels-last saves in the convolutions?), or the compiled model's
    rows when `compiled` is given (labelled `mode`)."""
    side = m.unet.config.image_size
    amp = device.type == "cuda"
    runs = ([(mode, compiled, True)] if compiled is not None else
            [("eager", m.unet, True), ("eager, NCHW", m.unet, False)])
    for label, fn, channels_last in runs:
        if compiled is None:
            m.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for b in batches:
            ms = time_forward(fn, b, side, device, amp, iters, 3, config=m.unet.config, channels_last=channels_last)
            tflops = PAPER_GFLOP * b / ms if side == 64 else float("nan")
            row("UNet forward", f"batch {b}, {'bf16' if amp else 'fp32'}, {label}", f"{ms / b:.3f} ms/sample",
                f"{tflops:.0f} TFLOP/s" if side == 64 else "small preset", out, ms_per_sample=ms / b,
                batch=b, mode=label)
    m.unet.to(memory_format=torch.channels_last)          # the samplers' layout


def vq_rows(m, device, out, compile_vq=False):
    """ms per decoded patch: eager fp32 and bf16 at batch 16; with `compile_vq` also the compiled decoder (bf16,
    batch 16 and 64, compile time apart), which the later sections then use (`dn.compile_networks`)."""
    h = m.latent_side
    z = torch.randn(16, 3, h, h, device=device)

    def vq_row(setting, ms, note, precision):
        row("VQ decode", setting, f"{ms:.2f} ms/patch", note, out, ms_per_patch=ms, precision=precision)

    for prec in ("fp32", "bf16"):
        m.vq_dtype = torch.bfloat16 if prec == "bf16" and device.type == "cuda" else None
        vq_row(f"batch 16, {prec}", ms_per_patch(lambda: m.decode(z), 16, device), f"{m.patch_px}² px", prec)
    if device.type == "cuda":   # eager GroupNorm may not take channels-last inputs natively: time NCHW too
        m.vq.to(memory_format=torch.contiguous_format)
        ms = ms_per_patch(lambda: m.decode(z), 16, device)
        m.vq.to(memory_format=torch.channels_last)
        vq_row("batch 16, bf16, NCHW weights (not channels-last)", ms, "eager", "bf16-nchw")
        # bf16 weights, no autocast: GroupNorm and SiLU stay bf16 (autocast runs them fp32)
        import copy
        vq16 = copy.deepcopy(m.vq).to(torch.bfloat16)
        zq = m.vq.quantize(z)[0].to(torch.bfloat16)
        vq_row("batch 16, bf16 weights without autocast", ms_per_patch(lambda: vq16.decode(zq, quantize=False), 16,
                                                                       device), "eager; not wired into the samplers",
               "bf16-weights")
        del vq16
    with torch.autocast(device.type, enabled=False):
        ms = ms_per_patch(lambda: m.vq.quantize(z.float()), 16, device, warm=False)
    vq_row("codebook search alone, batch 16, fp32", ms, "eager, in every decode", "fp32-quantize")
    if not compile_vq:
        return
    dn.compile_networks(m, unet=False)         # the VQ only: the UNet stays as "UNet compile" left it
    try:                                       # the search first, so that its compile is not in a decode's time
        _, s_first = timed(lambda: m.quantize(z), device)
        vq_row("codebook search alone, batch 16, fp32, compiled (codes_direct)",
               ms_per_patch(lambda: m.quantize(z), 16, device, warm=False), f"first call {s_first:.1f} s; in every "
               "compiled decode and surrogate step", "fp32-quantize-compiled")
        for b in (16, 64):
            zb = torch.randn(b, 3, h, h, device=device)
            _, s_first = timed(lambda zb=zb: m.decode(zb), device)
            vq_row(f"batch {b}, bf16, compiled (batch dim dynamic)",
                   ms_per_patch(lambda zb=zb: m.decode(zb), b, device, warm=False),
                   f"first call {s_first:.1f} s" + (" (the compile)" if b == 16 else " (no recompile expected)"),
                   "bf16-compiled")
    except Exception:
        m.vq_decode_fn = m.vq_codes_fn = None  # the later sections run on the eager VQ
        raise


def patch_rows(m, device, d, out, n=64, steps=50,
               caches=((1, 0, False), (2, 0, False), (3, 0, False), (5, 0, False), (5, 0, True))):
    """Patch images/s at `steps` DDIM steps + CFG s = 1.75, batch `n`, for each DeepCache setting (every, branch,
    forecast) of `caches` ((1, 0, False): off, the reference; forecast: the extrapolated feature, same FLOPs as
    reuse), with the share of the reference's UNet FLOPs each one runs (counted on the meta device). Each setting
    has a 5-step warm-up first: it compiles the shallow branch where the UNet is compiled."""
    from unet_forward import gflop_per_sample
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(n, 65, d, generator=g).to(device)
    m.vq_dtype = torch.bfloat16 if device.type == "cuda" else None
    side, cdim = m.unet.config.image_size, m.unet.config.context_dim
    full_gflop = gflop_per_sample(m.unet, side, cdim)
    nets = nets_label(m)

    def run(k, every, branch, forecast):
        with dn.autocast(device, "auto", "patches"):
            x_T = randn_items(0, range(n), (3, m.latent_side, m.latent_side), device)
            lat = ddim_sample(dn.patch_eps_fn(m, ctx, 1.75, every, branch, forecast), x_T, m.schedule, k)
            return m.decode(lat)
    for every, branch, forecast in caches:
        run(5, every, branch, forecast)                                       # warm-up (and compile)
        m.counter = dn.Counter()
        _, s = timed(lambda e=every, b=branch, f=forecast: run(steps, e, b, f), device)
        c = m.counter
        shallow = gflop_per_sample(m.unet, side, cdim, branch) if every > 1 else 0.0
        share = (c.unet * full_gflop + c.unet_cached * shallow) / ((c.unet + c.unet_cached) * full_gflop)
        setting = ("no cache (reference)" if every == 1 else
                   f"DeepCache every {every}, branch {branch}{', forecast' if forecast else ''}")
        row("patch sampling", f"{n} images, {steps} DDIM steps + CFG, bf16 ({nets}), {setting}",
            f"{n / s:.1f} images/s", f"{c.unet:,} whole + {c.unet_cached:,} shallow sample-forwards, "
            f"{100 * share:.0f}% of the reference's UNet FLOPs", out, images_per_s=n / s, cache_every=every,
            cache_branch=branch, cache_forecast=forecast, flop_share=share)


def contexts(d: int, device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Random (guide (1, 65, d), patches (g², 65, d)) contexts per grid, the same in every section."""
    g = torch.Generator().manual_seed(1)
    return {grid: (torch.randn(1, 65, d, generator=g).to(device),
                   torch.randn(grid * grid, 65, d, generator=g).to(device)) for grid in (4, 16)}


def large_once(m, device, grid, cfg, linear_vq, stride, guide_ctx, patch_ctx, window_batch=64):
    """(JointResult, seconds of joint sampling, seconds of the blended decode, counters) of image 0."""
    m.counter = dn.Counter()
    h = m.latent_side
    base = dn.stream_seed(0, "large", grid, 0)
    with dn.autocast(device, "bf16", "joint"):   # bf16 as the compiled UNet (fp16 in production: same speed)
        def sample():
            x = randn_items(base, range(1 + grid * grid), (3, h, h), device)
            nf = step_noise_fn(base, range(1 + grid * grid), device)
            eps_fn = dn.joint_eps_fn(m, guide_ctx, patch_ctx, cfg.guidance_w)
            return joint_sample(eps_fn, m.encode, m.decode, m.schedule, x[:1], x[1:], grid, cfg, noise_fn=nf,
                                linear_vq=linear_vq)
        res, s_sample = timed(sample, device)
        _, s_blend = timed(lambda: decode_large(assemble(res.patch_latents, grid), m.decode, window=h,
                                                stride=stride, batch=window_batch,
                                                known=patch_windows(res.patch_images, grid, h)), device)
    return res, s_sample, s_blend, m.counter.as_dict()


def large_rows(m, device, d, out, budget, smoke, ref_steps):
    h = m.latent_side
    ctx = contexts(d, device)
    # reference: fp32 VQ (its finite differences through the encoder), patch batch 16 (official pattern),
    # timed on its first ref_steps outer steps (t = 1000, 950, ... as in the full run)
    compiled_vq = m.vq_decode_fn, m.vq_codes_fn                  # official: eager fp32 VQ
    m.vq_dtype, m.vq_decode_fn, m.vq_codes_fn = None, None, None
    try:
        ref_rows(m, device, out, ctx, h, smoke, ref_steps)
    finally:
        m.vq_decode_fn, m.vq_codes_fn = compiled_vq

    # the cut with the settings of sample.large.cut (K = 1, patch batch 64, bf16 VQ, decode stride window/2): the
    # real VQ decode in the residual only in every 3rd of 20 outer steps (the paper configs' decode_every) first,
    # then in every step (the default), then every step with the constraint on the first 14 of 20 only
    n_dec = 2 if smoke else 3
    big = 4 if smoke else 16
    steps = 2 if smoke else 20
    cut_rows(m, device, d, out, budget, smoke,
             [(4, None, n_dec, True), (4, None, n_dec, False), (big, None, n_dec, False), (4, None, None, False),
              (big, None, None, False), (big, steps * 7 // 10, None, False)])


def ref_rows(m, device, out, ctx, h, smoke, ref_steps):
    """The reference algorithm's rows (1024² timed on its first ref_steps outer steps, 4096² extrapolated)."""
    steps, k_ref = (2, 2) if smoke else (20, 10)
    n_part = min(ref_steps, steps)
    part = FastJointConfig(steps=n_part, inner_steps=k_ref, patch_batch=16)
    _, s, s_blend, cnt = large_once(m, device, 4, part, None, max(1, h // 4), *ctx[4])
    # part has stride 1000 / n_part; per outer step the work is the same whatever the stride
    ref_1k = s / n_part * steps + s_blend
    unet_full = cnt["unet_forwards"] // n_part * steps
    setting = f"reference (K = {k_ref}, {steps} steps, patch batch 16, fp32 VQ, stride {max(1, h // 4)})"
    row(f"large {4 * m.patch_px}²", setting,
        f"{ref_1k:.1f} s", f"extrapolated: {n_part} outer steps took {s:.1f} s (+ final decodes), blend "
        f"{s_blend:.1f} s; ~{unet_full:,} UNet forwards", out, seconds=ref_1k, algo="reference", grid=4)
    ref_4k = ref_1k * (1 + 16 * 16) / (1 + 4 * 4)
    row(f"large {16 * m.patch_px}²", "reference (same)", f"{ref_4k:.0f} s", "extrapolated: 4 x 4 time × 257/17", out,
        seconds=ref_4k, algo="reference", grid=16)


def cut_rows(m, device, d, out, budget, smoke, plan):
    """Whole images of the linear cut with the settings of `sample.large.cut`, one row per (grid, constraint
    steps, decode_every, warm-up only) in `plan`; the networks the section finds (compiled or eager)."""
    h = m.latent_side
    ctx = contexts(d, device)
    cut = LinearCutConfig()
    m.vq_dtype = torch.bfloat16 if device.type == "cuda" and cut.vq_precision == "bf16" else None
    t0 = time.perf_counter()
    lin = dn.linear_vq_for(m)              # random codebook latents: random weights have no store
    row("linear VQ fit", "64 latents, least squares", f"{time.perf_counter() - t0:.2f} s", "once per run", out)
    steps = 2 if smoke else 20
    nets = nets_label(m)
    stride = cut.decode_stride or half_stride(h)
    for grid, n_con, n_dec, warm in plan:
        if grid == 16 and budget.left() < 60:
            row(f"large {grid * m.patch_px}²", "linear cut", "skipped", "time budget", out)
            continue
        c = FastJointConfig(steps=steps, inner_steps=cut.inner_steps, patch_batch=cut.patch_batch,
                            constraint_mode="linear", constraint_steps=n_con, decode_every=n_dec)
        _, s, s_blend, cnt = large_once(m, device, grid, c, lin, stride, *ctx[grid])
        if warm:
            continue
        which = "all" if n_con is None else f"first {n_con} of"
        real = "every step" if n_dec is None else f"1 of every {n_dec} steps"
        row(f"large {grid * m.patch_px}²", f"linear cut (K = {c.inner_steps}, constraint on {which} {steps} steps, "
            f"VQ decode in the residual in {real}, patch batch {c.patch_batch}, {cut.vq_precision} VQ, "
            f"stride {stride}; {nets})", f"{s + s_blend:.1f} s",
            f"sampling {s:.1f} s + blend {s_blend:.1f} s; {cnt['unet_forwards']:,} UNet, {cnt['vq_decodes']:,} VQ "
            f"decodes, 0 encodes", out, seconds=s + s_blend,
            algo=f"linear-K{c.inner_steps}-{n_con or steps}" + ("" if n_dec is None else f"-every{n_dec}"),
            grid=grid, **cnt)


def diag_rows(m, device, out):
    """Peak memory of one batch-128 UNet forward and one batch-64 VQ decode (bf16), and VQ decode speed with
    cuDNN's benchmark mode (autotuned convolution algorithms) at the loop's batch sizes."""
    if device.type != "cuda":
        row("diag", "skipped", "-", "CPU", out)
        return
    h, d = m.latent_side, m.unet.config.context_dim
    for what, fn in [
        ("UNet forward, batch 128, bf16", lambda: m.unet(torch.randn(128, 3, h, h, device=device),
                                                         torch.randint(0, 1000, (128,), device=device),
                                                         torch.randn(128, 65, d, device=device))),
        ("VQ decode, batch 64, bf16", lambda: m.decode(torch.randn(64, 3, h, h, device=device)))]:
        m.vq_dtype = torch.bfloat16
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn()
        sync(device)
        row("peak memory", what, f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.1f} GiB", "above weights"
            + ("; compiled decoder" if "VQ" in what and m.vq_decode_fn is not None else ""), out)
    torch.backends.cudnn.benchmark = True
    for b in (16, 129):
        z = torch.randn(b, 3, h, h, device=device)
        ms = ms_per_patch(lambda: m.decode(z), b, device, reps=2)
        row("VQ decode", f"batch {b}, bf16, cudnn.benchmark", f"{ms:.2f} ms/patch",
            "compiled decoder" if m.vq_decode_fn is not None else "eager", out, ms_per_patch=ms)
    # off again: with it on, every new batch shape autotunes every convolution inside the next timed run (the
    # likely cause of run 3's 4096² row saving 2.2 s instead of 7.6 s: its 4096² batch shapes were new)
    torch.backends.cudnn.benchmark = False


def profile_rows(m, device, d, out, smoke):
    """torch.profiler over one 1024² image of the linear cut (K = 1, decode_every 3): the top operators by device
    time go to OUT/profile.txt, the top 3 into the table (where the loop's time goes beyond UNet and VQ)."""
    from torch.profiler import ProfilerActivity, profile
    h = m.latent_side
    guide_ctx, patch_ctx = contexts(d, device)[4]
    m.vq_dtype = torch.bfloat16 if device.type == "cuda" else None
    lin = dn.linear_vq_for(m)
    cut = LinearCutConfig()
    c = FastJointConfig(steps=2 if smoke else 20, inner_steps=cut.inner_steps, patch_batch=cut.patch_batch,
                        constraint_mode="linear", decode_every=2 if smoke else 3)
    large_once(m, device, 4, c, lin, half_stride(h), guide_ctx, patch_ctx)                # warm-up
    _, s_sample, s_blend, _ = large_once(m, device, 4, c, lin, half_stride(h), guide_ctx, patch_ctx)  # unprofiled
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        large_once(m, device, 4, c, lin, half_stride(h), guide_ctx, patch_ctx)
    cuda = device.type == "cuda"
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=30)
    (out / "profile.txt").write_text(table)

    def self_time(e) -> float:      # seconds of the operator itself (not its children)
        names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
        return next((getattr(e, n) for n in names if hasattr(e, n)), 0) / 1e6
    events = prof.key_averages()
    for e in sorted(events, key=self_time, reverse=True)[:4]:
        row(f"profile 1024² linear K = 1, decode_every {c.decode_every}", e.key[:60], f"{self_time(e):.2f} s self",
            f"{e.count} calls", out)
    if cuda:        # the GPU's busy time: the kernels' own intervals (one stream), against the unprofiled wall time
        from torch.autograd import DeviceType
        busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        row(f"profile 1024² linear K = 1, decode_every {c.decode_every}", "GPU busy / wall (unprofiled run)",
            f"{busy:.2f} s / {s_sample + s_blend:.2f} s", f"{launches:,} kernel launches; where busy < wall, the "
            "rest is host time between kernels", out, busy_s=busy, wall_s=s_sample + s_blend, launches=launches)


def train_rows(device, preset, out, batch=64, steps=10):
    from train_step import measure
    r = measure(preset, batch if device.type == "cuda" else 4, steps, 3, compile=False)
    row("training", f"{preset} UNet + Summarizer, AdamW, batch {r['batch']}, {r['precision']}",
        f"{r['samples_per_s']:.1f} samples/s", f"peak {r['peak']}", out, **r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--budget", type=float, default=420.0, help="Seconds for all sections.")
    ap.add_argument("--ref-steps", type=int, default=4, help="Outer steps of the timed reference run.")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, help="Run only these sections (names as in the table).")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: small preset, tiny sizes.")
    ap.add_argument("--patch-images", type=int, default=64,
                    help="Images per patch-sampling batch (the UNet batch is twice this: CFG).")
    args = ap.parse_args()
    unknown = [n for n in args.only or [] if n not in SECTIONS]
    if args.patch_images < 1:
        ap.error(f"--patch-images: must be ≥ 1, got {args.patch_images}")
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    preset = "small" if args.smoke else "paper"
    if args.smoke:
        torch.set_num_threads(1)
    budget = Budget(args.budget)
    # torch's defaults, as the zoomldm commands run (fp32 matmuls exact: the codebook search's argmin needs
    # it); runs before 2026-11-27 had TF32 matmuls on, which touched only matmuls outside bf16 autocast
    card = torch.cuda.get_device_name() if cuda else "CPU (smoke check, not a performance number)"
    print(f"# bench/run_all.py on {card}, torch {torch.__version__}, preset {preset}\n")
    print("| section | setting | value | note |\n|---|---|---|---|")
    row("machine", card, torch.__version__, "", args.out)
    torch.manual_seed(0)
    with torch.device(device):
        m = build(preset, device, count_only=False)
    d = SUMMARIZER_PRESETS[preset].hidden_dim
    m.unet = m.unet.to(memory_format=torch.channels_last).eval()
    m.vq = m.vq.to(memory_format=torch.channels_last).eval()
    k = 2 if args.smoke else 3                           # decode_every of the paper configs (2 of 2 steps smoke)
    sections = [
        ("UNet eager", 20, lambda: unet_rows(m, device, [34, 128] if cuda else [2], 20 if cuda else 2, args.out,
                                             None)),
        ("cut", 60, lambda: cut_rows(m, device, d, args.out, budget, args.smoke,
                                     [(4, None, k, True), (4, None, k, False), (16 if cuda else 4, None, k, False)])),
        ("UNet compile", 200, lambda: compile_unet(dynamic=True)),
        ("VQ", 20, lambda: vq_rows(m, device, args.out, cuda and not args.no_compile)),
        ("patches", 45, lambda: patch_rows(m, device, d, args.out,
                                                 *((args.patch_images, 50) if cuda else (2, 5)))),
        ("large", 120, lambda: large_rows(m, device, d, args.out, budget, args.smoke, args.ref_steps)),
        ("diag", 15, lambda: diag_rows(m, device, args.out)),
        ("profile", 30, lambda: profile_rows(m, device, d, args.out, args.smoke)),
        ("training", 40, lambda: (free_sampling(), train_rows(device, preset, args.out))),
        ("UNet compile static", 200, lambda: compile_unet(dynamic=False)),
    ]

    def compile_unet(dynamic: bool):
        """The samplers' UNet graphs (`dn.compile_networks`; the VQ section compiles the VQ), timed at batch 128
        (the patch sampler's CFG batch) and 34 (a 1024² cut step); every later section samples with them. With
        `dynamic`, one graph for every batch size (`sample.compile: true`); without, one per batch shape
        (`sample.compile: static`): does the dynamic graph (0.80 ms per sample-forward) leave speed behind? (The
        official UNet compiled, presumably static: 0.61 ms, issue 8.)"""
        mode = f"torch.compile(dynamic={dynamic})"
        if args.no_compile or not cuda:
            row("UNet forward", "compile" if dynamic else "compile static", "skipped",
                "--no-compile" if cuda else "CPU", args.out)
            return
        dn.compile_networks(m, vq=False, dynamic=dynamic)
        t0 = time.perf_counter()
        unet_rows(m, device, [128, 34], 20, args.out, lambda x, t, c: m.unet_fn(x, t, c, 0)[0],
                  "compile" if dynamic else mode)
        compiles = "compile" if dynamic else "two shapes' compiles"
        row("UNet forward", f"{mode} wall time, {compiles} included", f"{time.perf_counter() - t0:.0f} s", "",
            args.out)

    def free_sampling():
        m.unet_fn = m.unet_cached_fn = m.vq_decode_fn = m.vq_codes_fn = None
        for attr in ("unet", "vq"):
            setattr(m, attr, None)
        if cuda:
            torch.cuda.empty_cache()

    assert tuple(sec[0] for sec in sections) == SECTIONS
    if not args.only:
        sections = [sec for sec in sections if sec[0] not in OPT_IN]
    if args.only:                # in the order --only names them; a section named twice runs twice (e.g. patches
        by_name = {s[0]: s for s in sections}        # before and after "UNet compile": eager and compiled rows)
        sections = [by_name[name] for name in args.only]
    for name, need, fn in sections:
        if cuda:
            torch.cuda.empty_cache()
            print(f"[{name}] allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB, peak so far "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, {budget.left():.0f} s left", flush=True)
        if budget.left() < need:
            row(name, "skipped", "-", f"time budget ({budget.left():.0f} s left, needs ~{need} s)", args.out)
            continue
        try:
            with torch.no_grad() if name != "training" else contextlib.nullcontext():   # no autograd records
                fn()
        except Exception as e:  # one failing section must not cost the others' numbers
            traceback.print_exc()
            row(name, "FAILED", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "", args.out)
    table = ["| section | setting | value | note |", "|---|---|---|---|"]
    table += [f"| {r['section']} | {r['setting']} | {r['value']} | {r['note']} |" for r in ROWS]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\ntotal {time.perf_counter() - budget.start:.0f} s")


if __name__ == "__main__":
    main()
