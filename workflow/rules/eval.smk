# Evaluation stage: one small JSON per evaluation under results/metrics/ (DESIGN.md §7). Reference statistics
# are computed once per (dataset, magnification, extractor) into resources/fid_stats/ and reused by every
# FID job (and by Crop-FID, whose reference is the base magnification's real patches).
FID_STATS = f"resources/fid_stats/{CFG.dataset.name}"
METRICS = "results/metrics"
_E = CFG.eval
_SLUG = {m.slug: m.name for m in _mags.ladder(CFG.dataset.ladder)}
_slug = lambda name: _mags.find(CFG.dataset.ladder, name).slug

FID_METRICS = [f"{METRICS}/fid/{mo}/{c}/{m}.json" for mo, c, m in PATCH_SETS]
LARGE_METRICS = [f"{METRICS}/large_images/{v}_grid{g}.json" for v in _VARIANTS for g in _S.large.grids]


# The BLAS threads of the Fréchet distance's eigendecompositions: one per job (jobs run side by side).
BLAS = "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1"


rule fid_ref:
    input:
        store=f"{STORE}/store.json",
        config=ancient(CONFIG),
    output:
        f"{FID_STATS}/patch-{{mslug}}-{{extractor}}.npz",
    wildcard_constraints:
        mslug="|".join(_SLUG),
    log:
        "logs/eval/fid_ref_{mslug}_{extractor}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("eval.seed", "eval.fid"),
        mag=lambda wc: _SLUG[wc.mslug],
        blas=BLAS,
    shell:
        "{params.blas} {params.cli} eval fid-ref --config {input.config} --mag {params.mag} "
        "--extractor {wildcards.extractor} --out {output} --no-progress > {log} 2>&1"


rule eval_fid:
    input:
        samples=f"{SAMPLES}/patches/{{model}}/{{cond}}/{{mag}}/manifest.parquet",
        ref=lambda wc: f"{FID_STATS}/patch-{_slug(wc.mag)}-{_E.fid.extractor}.npz",
        config=ancient(CONFIG),
    output:
        f"{METRICS}/fid/{{model}}/{{cond}}/{{mag}}.json",
    log:
        "logs/eval/fid_{model}_{cond}_{mag}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("eval.fid"),
        samples=lambda wc, input: os.path.dirname(input.samples),
        blas=BLAS,
    shell:
        "{params.blas} {params.cli} eval fid --config {input.config} --samples {params.samples} --ref {input.ref} "
        "--method {wildcards.model} --cond {wildcards.cond} --mag {wildcards.mag} --out {output} "
        "--no-progress > {log} 2>&1"


rule eval_large:
    input:
        images=large_eval_inputs,
        config=ancient(CONFIG),
    output:
        f"{METRICS}/large_images/{{variant}}_grid{{grid}}.json",
    wildcard_constraints:
        variant="zoomldm|zoomldm_unconstrained|zoomldm_linear|graikos",
    log:
        "logs/eval/large_{variant}_grid{grid}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("eval.seed", "eval.fid", "eval.large"),
        images=lambda wc: f"{SAMPLES}/large/{wc.variant}/grid{wc.grid}",
        cache=FID_STATS,
        blas=BLAS,
    shell:
        "{params.blas} {params.cli} eval large --config {input.config} --images {params.images} "
        "--grid {wildcards.grid} --method {wildcards.variant} --ref-cache {params.cache} --out {output} "
        "--no-progress > {log} 2>&1"




# MIL: features per (encoder, magnification), then ABMIL CV per magnification and fused. Labels: eval.mil.labels
# (a slide,label CSV); the demo builds its pseudo-slide stain task (`zoomldm eval mil-demo-labels`).
_MIL_MAGS = CFG.eval.mil.magnifications or [
    m.name for m in _mags.ladder(CFG.dataset.ladder) if m.name in _DATA_MAGS and m.tiles_per_side in (1, 4)
]
_MIL_SETS = [*_MIL_MAGS, *(["_".join(_MIL_MAGS)] if len(_MIL_MAGS) > 1 else [])]   # the last: fused
MIL_LABELS = CFG.eval.mil.labels or f"resources/mil/{CFG.dataset.name}/demo_labels.csv"
MIL_METRICS = [f"{METRICS}/mil/{f}_{s.replace('.', '_')}.json" for f in CFG.eval.mil.features for s in _MIL_SETS]
_MIL_FEATS = f"resources/mil/{CFG.dataset.name}"

if MIL_METRICS:

    if not CFG.eval.mil.labels:

        rule mil_demo_labels:
            input:
                store=f"{STORE}/store.json",
                config=ancient(CONFIG),
            output:
                MIL_LABELS,
            log:
                "logs/eval/mil_demo_labels.log",
            conda:
                ENV
            params:
                cli=ZOOMLDM,
            shell:
                "{params.cli} eval mil-demo-labels --config {input.config} --out {output} > {log} 2>&1"


    rule mil_features:
        input:
            store=f"{STORE}/store.json",
            ckpt=lambda wc: [LDM_CKPT] if wc.features == "zoomldm" else [],
            config=ancient(CONFIG),
        output:
            f"{_MIL_FEATS}/{{features}}_{{mag}}.npz",
        wildcard_constraints:
            features="ssl|zoomldm",
        log:
            "logs/eval/mil_features_{features}_{mag}.log",
        threads: 1
        resources:
            gpu=1,
            mem_mb=16000,
            runtime=480,
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            cfg=section("eval.seed", "eval.mil"),
            ckpt=lambda wc, input: f"--ckpt {input.ckpt[0]}" if input.ckpt else "",
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} eval mil-features --config {input.config} --features {wildcards.features} "
            "--mag {wildcards.mag} {params.ckpt} --out {output} --no-progress > {log} 2>&1"


    rule eval_mil:
        input:
            feats=mil_feature_files,
            labels=MIL_LABELS,
            config=ancient(CONFIG),
        output:
            f"{METRICS}/mil/{{features}}_{{set}}.json",
        wildcard_constraints:
            features="ssl|zoomldm",
            set="[0-9a-z_]+",
        log:
            "logs/eval/mil_{features}_{set}.log",
        threads: 1
        resources:
            mem_mb=8000,
            runtime=120,
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            cfg=section("eval.seed", "eval.mil"),
            feats=lambda wc, input: " ".join(f"--features {f}" for f in input.feats),
        shell:
            "OMP_NUM_THREADS=1 {params.cli} eval mil --config {input.config} {params.feats} --labels {input.labels} "
            "--out {output} > {log} 2>&1"


# Super-resolution: SSIM / PSNR / LPIPS of every method against the HR regions (RGB, [0, 255]).
SR_METRICS = [f"{METRICS}/super_resolution/{m}.json" for m in SR_METHODS]


rule eval_sr:
    input:
        outputs=lambda wc: [f"{SAMPLES}/sr/{wc.method}/{k}.json" for k in range(_S.sr.n)],
        pairs=[f"{SAMPLES}/sr/inputs/{k}.json" for k in range(_S.sr.n)],
        config=ancient(CONFIG),
    output:
        f"{METRICS}/super_resolution/{{method}}.json",
    wildcard_constraints:
        method="|".join(SR_METHODS),
    log:
        "logs/eval/sr_{method}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("eval.sr"),
        pairs=lambda wc, input: os.path.dirname(input.pairs[0]),
        outputs=lambda wc: f"{SAMPLES}/sr/{wc.method}",
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} eval sr --config {input.config} --pairs {params.pairs} --outputs {params.outputs} "
        "--method {wildcards.method} --out {output} > {log} 2>&1"


rule evaluation:
    input:
        FID_METRICS,
        LARGE_METRICS,
        SR_METRICS,
        MIL_METRICS,
