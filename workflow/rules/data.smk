# Dataset stage: slides -> per-slide parts (tiles, embeddings, regions) -> sharded store -> table + montage.

if CFG.demo_data:

    rule fetch_demo:
        output:
            [str(p) for p in demo_paths(CFG.demo_data)],
        log:
            "logs/data/fetch_demo.log",
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            which=CFG.demo_data,
        shell:
            "{params.cli} data fetch-demo {params.which} --out resources/demo > {log} 2>&1"


rule extract_slide:
    input:
        slide=lambda wc: SLIDES[wc.slide],
        config=ancient(CONFIG),
    output:
        directory(f"{PARTS}/{{slide}}"),
    log:
        "logs/data/extract/{slide}.log",
    benchmark:
        "logs/data/extract/{slide}.bench.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("dataset", "encoder"),
        parts=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "{params.cli} data extract --config {input.config} --slide {input.slide} "
        "--parts {params.parts} --no-progress > {log} 2>&1"


rule build_store:
    input:
        parts=expand(f"{PARTS}/{{slide}}", slide=sorted(SLIDES)),
        config=ancient(CONFIG),
    output:
        f"{STORE}/store.json",
    log:
        "logs/data/build_store.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("dataset"),
        parts=lambda wc, input: os.path.dirname(input.parts[0]),
        store=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "{params.cli} data build-store --config {input.config} --parts {params.parts} "
        "--out {params.store} > {log} 2>&1"


rule dataset_summary:
    input:
        store=f"{STORE}/store.json",
        refs=os.path.join(workflow.basedir, "workflow/references/dataset.csv"),
        config=ancient(CONFIG),
    output:
        csv=report("results/tables/dataset.csv", caption="../report/dataset_table.rst", category="Tables"),
        md="results/tables/dataset.md",
        tex="results/tables/dataset.tex",
        montage=report(
            "results/figures/dataset_montage.png",
            caption="../report/dataset_montage.rst",
            category="Dataset",
        ),
    log:
        "logs/data/dataset_summary.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("dataset"),
        table=lambda wc, output: os.path.splitext(output.csv)[0],
    shell:
        "{params.cli} data summary --config {input.config} --table {params.table} "
        "--montage {output.montage} --references {input.refs} > {log} 2>&1"


rule dataset:
    input:
        rules.dataset_summary.output,
