# Sampling stage: patch sets for FID (per magnification, model and conditioning source, one job per shard),
# large images by joint multi-scale sampling with and without the constraint, Graikos panoramas of the same
# regions, and super-resolution of real LR regions (one job per image). Every job is one `zoomldm sample` call
# and skips what is already written, so a rerun resumes. Jobs are single-threaded (OMP_NUM_THREADS={threads}):
# on a CPU several run side by side; on a GPU node the profile's cpus_per_gpu still applies.
import math

from zoomldm import mags as _mags

SAMPLES = f"resources/samples/{CFG.dataset.name}"
_S = CFG.sample
_LDM = LDM_CKPT
_CDM = CDM_CKPT
_GRAIKOS = f"{RUNS}/graikos/model.safetensors"
_DATA_MAGS = [m.name for m in CFG.dataset.magnification_list()]
_PATCH_MAGS = _S.patches.magnifications or _DATA_MAGS
_N_SHARDS = math.ceil(_S.patches.n_per_mag / _S.patches.shard_size)


# A grid g needs the magnification spanning g x g base tiles among dataset.magnifications (4 -> 5x on BRCA).
_GUIDE_MAGS = {m.tiles_per_side: m.name for m in _mags.ladder(CFG.dataset.ladder) if m.name in _DATA_MAGS}
for _key, _grids in [("sample.large.grids", _S.large.grids), ("sample.sr.grid", [_S.sr.grid])]:
    for _g in _grids:
        if _g not in _GUIDE_MAGS:
            raise WorkflowError(
                f"config key '{_key}': grid {_g} needs the magnification spanning {_g}x{_g} base tiles, "
                f"which dataset.magnifications does not include"
            )

# (model, conditioning, magnification) of every patch set.
PATCH_SETS = [("zoomldm", c, m) for c in _S.patches.cond for m in _PATCH_MAGS]
if _S.patches.single_scale:
    PATCH_SETS += [("single_scale", "store", m) for m in _SINGLE if m in _PATCH_MAGS]
if _S.patches.graikos and _DATA_MAGS[0] in _PATCH_MAGS:
    PATCH_SETS += [("graikos", "store", _DATA_MAGS[0])]
if _S.patches.deepcache_variant:   # issue #8's patch cut beside the reference: same model, seeds and conditions
    PATCH_SETS += [("zoomldm_cached", "store", m) for m in _PATCH_MAGS]
PATCH_MANIFESTS = [f"{SAMPLES}/patches/{mo}/{c}/{m}/manifest.parquet" for mo, c, m in PATCH_SETS]

_VARIANTS = ["zoomldm"] + (["zoomldm_unconstrained"] if _S.large.unconstrained else [])
_VARIANTS += ["zoomldm_linear"] if _S.large.linear else []   # issue #8's cut beside the reference, same seeds
_VARIANTS += ["graikos"] if _S.large.graikos else []


N_LARGE = {g: _S.large.n_by_grid.get(str(g), _S.large.n) for g in _S.large.grids}
LARGE_IMAGES = [f"{SAMPLES}/large/{v}/grid{g}/{i}.json" for v in _VARIANTS for g in _S.large.grids
                for i in range(N_LARGE[g])]
CONSISTENCY = "results/metrics/large_images/consistency.json"
# SR: ZoomLDM with and without the LR constraint (same seeds and inverted condition), and the baselines.
SR_METHODS = ["bicubic", "ldm_sr", "controlnet", "zoomldm", "zoomldm_unconstrained"]
SR_OUTPUTS = [f"{SAMPLES}/sr/{m}/{k}.json" for m in SR_METHODS for k in range(_S.sr.n)]


# The checkpoint of a patch set, and the CDM a job needs (--cond cdm only).
_patch_ckpt = lambda wc: {"zoomldm": _LDM, "zoomldm_cached": _LDM, "graikos": _GRAIKOS}.get(
    wc.model, f"{RUNS}/single_scale/{wc.mag}/model.safetensors"
)
# The patch sets the tables set beside the paper follow the official protocol: DeepCache only as its own variant.
if _S.patches.cache_every != 1:
    raise WorkflowError(
        "config key 'sample.patches.cache_every': the workflow's patch sets are the reference the tables compare "
        "with the paper; set sample.patches.deepcache_variant to sample DeepCache beside them (cache_every is the "
        "default of a standalone `zoomldm sample patches`)"
    )
# The cache keys reach only the variant's jobs, as flags: turning the variant on or off, or changing its branch or
# forecast, reruns no other patch job.
_PATCH_CACHE_KEYS = [f"sample.patches.{k}" for k in ("deepcache_variant", "cache_every", "cache_branch",
                                                      "cache_forecast")]
_patch_cfg = section("sample.seed", "sample.patches", drop=_PATCH_CACHE_KEYS)
_cache_opt = lambda wc: (f"--cache-every {_S.patches.deepcache_variant} --cache-branch {_S.patches.cache_branch} "
                         f"--{'' if _S.patches.cache_forecast else 'no-'}cache-forecast"
                         if wc.model == "zoomldm_cached" else "")
_cdm_input = lambda wc: [_CDM] if getattr(wc, "cond", _S.large.cond) == "cdm" else []


wildcard_constraints:
    model="zoomldm|zoomldm_cached|single_scale|graikos",
    cond="store|cdm",
    mag="|".join(m.name.replace(".", r"\.") for m in _mags.ladder(CFG.dataset.ladder)),
    shard=r"\d{5}",
    grid=r"\d+",
    i=r"\d+",


# A set that fits one shard (the demo) is one job that also writes the manifest; larger sets are one job per
# shard plus a cheap merge job.
if _N_SHARDS == 1:

    rule sample_patches:
        input:
            ckpt=_patch_ckpt,
            cdm=_cdm_input,
            store=f"{STORE}/store.json",
            config=ancient(CONFIG),
        output:
            images=f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/images-00000.npy",
            shard=f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/manifest-00000.parquet",
            manifest=f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/manifest.parquet",
        log:
            "logs/sample/patches/{model}_{cond}_{mag}.log",
        benchmark:
            "logs/sample/patches/{model}_{cond}_{mag}.bench.tsv"
        threads: 1
        resources:
            gpu=1,
            mem_mb=8000,
            runtime=240,
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            cfg=_patch_cfg,
            cdm=lambda wc, input: f"--cdm-ckpt {input.cdm[0]}" if input.cdm else "",
            cache=_cache_opt,
            out=lambda wc, output: os.path.dirname(output.images),
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} sample patches --config {input.config} --ckpt {input.ckpt} --mag {wildcards.mag} "
            "--cond {wildcards.cond} {params.cdm} {params.cache} --out {params.out} --no-progress > {log} 2>&1"

else:

    rule sample_patches_shard:
        input:
            ckpt=_patch_ckpt,
            cdm=_cdm_input,
            store=f"{STORE}/store.json",
            config=ancient(CONFIG),
        output:
            images=f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/images-{{shard}}.npy",
            manifest=f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/manifest-{{shard}}.parquet",
        log:
            "logs/sample/patches/{model}_{cond}_{mag}_{shard}.log",
        benchmark:
            "logs/sample/patches/{model}_{cond}_{mag}_{shard}.bench.tsv"
        threads: 1
        resources:
            gpu=1,
            mem_mb=8000,
            runtime=240,
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            cfg=_patch_cfg,
            cdm=lambda wc, input: f"--cdm-ckpt {input.cdm[0]}" if input.cdm else "",
            cache=_cache_opt,
            shard=lambda wc: int(wc.shard),
            out=lambda wc, output: os.path.dirname(output.images),
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} sample patches --config {input.config} --ckpt {input.ckpt} --mag {wildcards.mag} "
            "--cond {wildcards.cond} {params.cdm} {params.cache} --shard {params.shard} --out {params.out} --no-progress "
            "> {log} 2>&1"


    rule sample_patches:
        input:
            shards=lambda wc: expand(
                f"{SAMPLES}/patches/{wc.model}/{wc.cond}/{wc.mag}/images-{{s:05d}}.npy", s=range(_N_SHARDS)
            ),
            config=ancient(CONFIG),
        output:
            f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/manifest.parquet",
        log:
            "logs/sample/patches/{model}_{cond}_{mag}_manifest.log",
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            cfg=section("sample.patches", drop=_PATCH_CACHE_KEYS),
            ckpt=_patch_ckpt,
            cache=_cache_opt,   # only merges when every shard exists; the flag keeps any shard it samples right
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} sample patches --config {input.config} --ckpt {params.ckpt} --mag {wildcards.mag} "
            "--cond {wildcards.cond} {params.cache} --out {params.out} --no-progress > {log} 2>&1"


# The cut's linear VQ, fitted once per run: every zoomldm_linear job loads it instead of refitting (on an H100
# the fit costs a job more than sampling a 1024² image).
_LINEAR_FIT = f"{SAMPLES}/large/zoomldm_linear/linear_vq.safetensors"


rule fit_linear_vq:
    input:
        ckpt=_LDM,
        store=f"{STORE}/store.json",
        config=ancient(CONFIG),
    output:
        _LINEAR_FIT,
    log:
        "logs/sample/large/fit_linear_vq.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=30,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample fit-linear --config {input.config} --ckpt {input.ckpt} "
        "--out {output} > {log} 2>&1"


# One job per large image (i: the item index; image i depends only on (sample.seed, i)).
rule sample_large:
    input:
        ckpt=_LDM,
        cdm=_cdm_input,
        store=f"{STORE}/store.json",
        config=ancient(CONFIG),
        linear_vq=lambda wc: [_LINEAR_FIT] if wc.variant == "zoomldm_linear" else [],
    output:
        image=f"{SAMPLES}/large/{{variant}}/grid{{grid}}/{{i}}.png",
        guide=f"{SAMPLES}/large/{{variant}}/grid{{grid}}/{{i}}_guide.png",
        json=f"{SAMPLES}/large/{{variant}}/grid{{grid}}/{{i}}.json",
    wildcard_constraints:
        variant="zoomldm|zoomldm_unconstrained|zoomldm_linear",
    log:
        "logs/sample/large/{variant}_grid{grid}_{i}.log",
    benchmark:
        "logs/sample/large/{variant}_grid{grid}_{i}.bench.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        # the reference variants do not read sample.large.cut: changing it reruns only zoomldm_linear
        cfg=lambda wc: section("sample.seed", "sample.large",
                               drop=() if wc.variant == "zoomldm_linear" else ["sample.large.cut"]),
        n=lambda wc: N_LARGE[int(wc.grid)],
        flags=lambda wc, input: " ".join(
            (["--no-constraint"] if wc.variant.endswith("unconstrained") else [])
            + ([f"--constraint-mode linear --linear-vq {input.linear_vq[0]}"] if wc.variant == "zoomldm_linear" else [])
            + ([f"--cond cdm --cdm-ckpt {input.cdm[0]}"] if input.cdm else ["--cond store"])
        ),
        out=lambda wc, output: os.path.dirname(output.image),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample large --config {input.config} --ckpt {input.ckpt} --grid {wildcards.grid} "
        "--n {params.n} --shard {wildcards.i} --num-shards {params.n} {params.flags} --out {params.out} "
        "--no-progress > {log} 2>&1"


rule sample_graikos_large:
    input:
        ckpt=_GRAIKOS,
        store=f"{STORE}/store.json",
        config=ancient(CONFIG),
    output:
        image=f"{SAMPLES}/large/graikos/grid{{grid}}/{{i}}.png",
        json=f"{SAMPLES}/large/graikos/grid{{grid}}/{{i}}.json",
    log:
        "logs/sample/large/graikos_grid{grid}_{i}.log",
    benchmark:
        "logs/sample/large/graikos_grid{grid}_{i}.bench.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("sample.seed", "sample.large", drop=["sample.large.cut"]),
        n=lambda wc: N_LARGE[int(wc.grid)],
        out=lambda wc, output: os.path.dirname(output.image),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample graikos-large --config {input.config} --ckpt {input.ckpt} --grid {wildcards.grid} "
        "--n {params.n} --shard {wildcards.i} --num-shards {params.n} --out {params.out} --no-progress "
        "> {log} 2>&1"


rule large_consistency:
    input:
        on=[f"{SAMPLES}/large/zoomldm/grid{g}/{i}.json" for g in _S.large.grids for i in range(N_LARGE[g])],
        off=[
            f"{SAMPLES}/large/zoomldm_unconstrained/grid{g}/{i}.json"
            for g in _S.large.grids
            for i in range(N_LARGE[g])
        ],
    output:
        CONSISTENCY,
    log:
        "logs/sample/large_consistency.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        dirs=lambda wc, input: " ".join(
            f"--constrained {a} --unconstrained {b}"
            for a, b in zip(
                sorted({os.path.dirname(p) for p in input.on}),
                sorted({os.path.dirname(p) for p in input.off}),
            )
        ),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample consistency {params.dirs} --out {output} > {log} 2>&1"


rule sr_inputs:
    input:
        store=f"{STORE}/store.json",
        config=ancient(CONFIG),
    output:
        lr=[f"{SAMPLES}/sr/inputs/lr/{k}.png" for k in range(_S.sr.n)],
        hr=[f"{SAMPLES}/sr/inputs/hr/{k}.png" for k in range(_S.sr.n)],
        json=[f"{SAMPLES}/sr/inputs/{k}.json" for k in range(_S.sr.n)],
    log:
        "logs/sample/sr_inputs.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("sample.seed", "sample.sr"),
        out=lambda wc, output: os.path.dirname(output.json[0]),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample sr-inputs --config {input.config} --out {params.out} > {log} 2>&1"


rule sample_sr:
    input:
        ckpt=_LDM,
        lr=f"{SAMPLES}/sr/inputs/lr/{{i}}.png",
        config=ancient(CONFIG),
    output:
        image=f"{SAMPLES}/sr/{{variant}}/{{i}}.png",
        json=f"{SAMPLES}/sr/{{variant}}/{{i}}.json",
    wildcard_constraints:
        variant="zoomldm|zoomldm_unconstrained",
    log:
        "logs/sample/sr/{variant}_{i}.log",
    benchmark:
        "logs/sample/sr/{variant}_{i}.bench.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("sample.seed", "sample.sr", "sample.large", drop=["sample.large.cut"]),
        flag=lambda wc: "--no-constraint" if wc.variant.endswith("unconstrained") else "--constraint",
        out=lambda wc, output: os.path.dirname(output.image),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample sr --config {input.config} --ckpt {input.ckpt} --lr {input.lr} {params.flag} "
        "--out {params.out} --no-progress > {log} 2>&1"


_SR_CKPT = {"ldm_sr": [f"{RUNS}/ldm_sr/model.safetensors"], "controlnet": [f"{RUNS}/controlnet/model.safetensors"]}


rule sample_sr_baseline:
    input:
        ckpt=lambda wc: _SR_CKPT.get(wc.method, []),
        zoomldm=lambda wc: [_LDM] if wc.method == "controlnet" else [],
        lr=f"{SAMPLES}/sr/inputs/lr/{{i}}.png",
        config=ancient(CONFIG),
    output:
        image=f"{SAMPLES}/sr/{{method}}/{{i}}.png",
        json=f"{SAMPLES}/sr/{{method}}/{{i}}.json",
    wildcard_constraints:
        method="bicubic|ldm_sr|controlnet",
    log:
        "logs/sample/sr/{method}_{i}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("sample.seed", "sample.sr"),
        models=lambda wc, input: " ".join(
            ([f"--ckpt {input.ckpt[0]}"] if input.ckpt else []) + ([f"--zoomldm {input.zoomldm[0]}"] if input.zoomldm else [])
        ),
        out=lambda wc, output: os.path.dirname(output.image),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} sample sr-baseline --config {input.config} --method {wildcards.method} {params.models} "
        "--lr {input.lr} --out {params.out} --no-progress > {log} 2>&1"


rule sampling:
    input:
        PATCH_MANIFESTS,
        LARGE_IMAGES,
        [CONSISTENCY] if _S.large.unconstrained else [],
        SR_OUTPUTS,
