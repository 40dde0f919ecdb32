# Report stage: tables (csv, md, tex) and figures from the metric JSON files only, each table beside the paper's
# values from workflow/references/. `snakemake --report report.html` collects the outputs marked report().
from pathlib import Path

REFERENCES = os.path.join(workflow.basedir, "workflow/references")
FIGURES = "results/figures"
_TABLES = ["fid_by_magnification", "large_images", "super_resolution"] + (["mil"] if MIL_METRICS else [])


# results/metrics/fid/<model>/<cond>/<mag>.json -> results/metrics;
# <samples>/patches/<model>/<cond>/<mag>/manifest.parquet -> <samples>
_metrics_root = lambda wc, input: str(Path(input.fid[0]).parents[3])
_samples_root = lambda wc, input: str(Path(input.patches[0]).parents[4])


rule report_tables:
    input:
        fid=FID_METRICS,
        large=LARGE_METRICS,
        consistency=[CONSISTENCY] if _S.large.unconstrained else [],
        sr=SR_METRICS,
        mil=MIL_METRICS,
        config=ancient(CONFIG),
    output:
        **{
            f"{t}_{ext}": (
                report(f"results/tables/{t}.{ext}", caption=f"../report/{t}.rst", category="Tables")
                if ext == "csv"
                else f"results/tables/{t}.{ext}"
            )
            for t in _TABLES
            for ext in ("csv", "md", "tex")
        },
    log:
        "logs/report/tables.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        metrics=_metrics_root,
        refs=REFERENCES,
        tables=" ".join(f"--table {t}" for t in _TABLES),
    shell:
        "{params.cli} report tables --config {input.config} --metrics {params.metrics} --references {params.refs} "
        "--out results/tables {params.tables} > {log} 2>&1"


rule report_figures:
    input:
        fid=FID_METRICS,
        patches=PATCH_MANIFESTS,
        large=LARGE_IMAGES,
        sr=SR_METRICS,
        config=ancient(CONFIG),
    output:
        fid=report(f"{FIGURES}/fid_vs_magnification.png", caption="../report/fid_vs_magnification.rst",
                   category="Figures"),
        samples=[
            report(f"{FIGURES}/samples_{_slug(m)}.png", caption="../report/sample_grids.rst", category="Figures")
            for m in _PATCH_MAGS
        ],
        large=[
            report(f"{FIGURES}/large_grid{g}.png", caption="../report/large_thumbnails.rst", category="Figures")
            for g in _S.large.grids
        ],
        sr=report(f"{FIGURES}/sr_examples.png", caption="../report/sr_examples.rst", category="Figures"),
    log:
        "logs/report/figures.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        metrics=_metrics_root,
        refs=REFERENCES,
        samples=_samples_root,
        out=lambda wc, output: os.path.dirname(output.fid),
    shell:
        "{params.cli} report figures --config {input.config} --metrics {params.metrics} --references {params.refs} "
        "--samples {params.samples} --out {params.out} > {log} 2>&1"


rule report:
    input:
        rules.report_tables.output,
        rules.report_figures.output,
        rules.dataset_summary.output,
