# Training stage: VQ autoencoder (unless models.vq_checkpoint is given) -> latents in the store -> ZoomLDM,
# single-scale models, the Graikos baseline, the CDM. Rerunning a job resumes from its run folder.
# With models.zoomldm_release / cdm_release the released weights are converted instead (release.smk).
# Jobs run with OMP_NUM_THREADS={threads}, 1 by default so a CPU runs two side by side; the SLURM profile sets
# the threads of every GPU rule (set-threads).


if TRAIN_AUTOENCODER:

    rule train_autoencoder:
        input:
            store=f"{STORE}/store.json",
            config=ancient(CONFIG),
        output:
            f"{RUNS}/autoencoder/final.safetensors",
        log:
            "logs/train/autoencoder.log",
        benchmark:
            "logs/train/autoencoder.bench.tsv"
        threads: 1
        resources:
            gpu=1,
            mem_mb=16000,
            runtime=600,
        conda:
            ENV
        params:
            cli=launcher,
            cfg=section("dataset", "train.autoencoder"),
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} train autoencoder --config {input.config} --out {params.out} --no-progress "
            "> {log} 2>&1"


rule encode_latents:
    input:
        store=f"{STORE}/store.json",
        vq=VQ_CHECKPOINT,
        config=ancient(CONFIG),
    output:
        f"{STORE}/latents.json",
    log:
        "logs/train/encode_latents.log",
    threads: 1
    resources:
        gpu=1,
        runtime=240,
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        cfg=section("dataset", "models"),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} data encode-latents --config {input.config} --vq {input.vq} --no-progress > {log} 2>&1"


if not USE_RELEASE:

    rule train_ldm:
        input:
            latents=f"{STORE}/latents.json",
            config=ancient(CONFIG),
        output:
            f"{RUNS}/ldm/model.safetensors",
        log:
            "logs/train/ldm.log",
        benchmark:
            "logs/train/ldm.bench.tsv"
        threads: 1
        resources:
            gpu=1,
            mem_mb=32000,
            runtime=2880,
        conda:
            ENV
        params:
            cli=launcher,
            cfg=section("train.ldm"),
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} train ldm --config {input.config} --out {params.out} --no-progress > {log} 2>&1"


rule train_single_scale:
    input:
        latents=f"{STORE}/latents.json",
        config=ancient(CONFIG),
    output:
        f"{RUNS}/single_scale/{{mag}}/model.safetensors",
    log:
        "logs/train/single_scale_{mag}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=2880,
    conda:
        ENV
    params:
        cli=launcher,
        cfg=section("train.single_scale"),
        out=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} train single-scale --config {input.config} --mag {wildcards.mag} --out {params.out} "
        "--no-progress > {log} 2>&1"


rule train_graikos:
    input:
        latents=f"{STORE}/latents.json",
        config=ancient(CONFIG),
    output:
        f"{RUNS}/graikos/model.safetensors",
    log:
        "logs/train/graikos.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=2880,
    conda:
        ENV
    params:
        cli=launcher,
        cfg=section("train.graikos"),
        out=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} train graikos --config {input.config} --out {params.out} --no-progress > {log} 2>&1"


if not USE_CDM_RELEASE:

    rule train_cdm:
        input:
            ldm=LDM_CKPT,
            config=ancient(CONFIG),
        output:
            f"{RUNS}/cdm/final.safetensors",
        log:
            "logs/train/cdm.log",
        threads: 1
        resources:
            gpu=1,
            mem_mb=16000,
            runtime=1440,
        conda:
            ENV
        params:
            cli=launcher,
            cfg=section("train.cdm"),
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "OMP_NUM_THREADS={threads} {params.cli} train cdm --config {input.config} --ldm-ckpt {input.ldm} --out {params.out} "
            "--no-progress > {log} 2>&1"


# SR baselines (evaluation table "super_resolution"): LDM-SR trained on the store, and a ControlNet on the
# frozen ZoomLDM (the released one when models.zoomldm_release is set).
rule train_ldm_sr:
    input:
        latents=f"{STORE}/latents.json",
        config=ancient(CONFIG),
    output:
        f"{RUNS}/ldm_sr/model.safetensors",
    log:
        "logs/train/ldm_sr.log",
    benchmark:
        "logs/train/ldm_sr.bench.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=1440,
    conda:
        ENV
    params:
        cli=launcher,
        cfg=section("train.ldm_sr"),
        out=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} train ldm-sr --config {input.config} --out {params.out} --no-progress > {log} 2>&1"


rule train_controlnet:
    input:
        latents=f"{STORE}/latents.json",
        zoomldm=LDM_CKPT,
        config=ancient(CONFIG),
    output:
        f"{RUNS}/controlnet/model.safetensors",
    log:
        "logs/train/controlnet.log",
    benchmark:
        "logs/train/controlnet.bench.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=1440,
    conda:
        ENV
    params:
        cli=launcher,
        cfg=section("train.controlnet"),
        out=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} train controlnet --config {input.config} --zoomldm {input.zoomldm} --out {params.out} "
        "--no-progress > {log} 2>&1"


rule training_table:
    input:
        TRAIN_RUNS,
    output:
        csv="results/tables/training.csv",
        md="results/tables/training.md",
    log:
        "logs/train/training_table.log",
    conda:
        ENV
    params:
        cli=ZOOMLDM,
        runs=lambda wc, input: " ".join(os.path.dirname(p) for p in input),
        table=lambda wc, output: os.path.splitext(output.csv)[0],
    shell:
        "{params.cli} train table --out {params.table} {params.runs} > {log} 2>&1"


rule training:
    input:
        rules.training_table.output,
