# Released weights instead of training (models.zoomldm_release / models.cdm_release): the official checkpoints
# are converted once, with every key and shape checked, and the converted files feed sampling and evaluation
# (common.smk: LDM_CKPT, CDM_CKPT, VQ_CHECKPOINT). Downloading the release is opt-in (models.fetch_release).
_M = CFG.models

if _M.fetch_release:

    localrules:
        fetch_release,

    # The hub layout is <out>/<ladder>/weights.ckpt + config.yaml, so the configured paths must end that way.
    _release_dir = os.path.dirname(os.path.dirname(_M.zoomldm_release or ""))
    if not USE_RELEASE or _M.zoomldm_release != os.path.join(_release_dir, CFG.dataset.ladder, "weights.ckpt"):
        raise WorkflowError(
            "config key 'models.fetch_release': set models.zoomldm_release to <dir>/"
            f"{CFG.dataset.ladder}/weights.ckpt and models.zoomldm_release_config to <dir>/"
            f"{CFG.dataset.ladder}/config.yaml (the hub layout)"
        )

    rule fetch_release:
        output:
            ckpt=_M.zoomldm_release,
            config=_M.zoomldm_release_config,
        log:
            "logs/release/fetch.log",
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            out=_release_dir,
        shell:
            "{params.cli} convert fetch-official --dataset {CFG.dataset.ladder} --out {params.out} --yes "
            "> {log} 2>&1"


if USE_RELEASE:

    rule convert_release:
        input:
            ckpt=_M.zoomldm_release,
            config=_M.zoomldm_release_config,
        output:
            LDM_CKPT,
        log:
            "logs/release/convert_zoomldm.log",
        threads: 2
        resources:
            mem_mb=32000,
            runtime=60,
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            flags=("--ema " if _M.release_ema else "") + ("--trust-pickle" if _M.trust_pickle else ""),
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "{params.cli} convert official --ckpt {input.ckpt} --config {input.config} --out {params.out} "
            "{params.flags} > {log} 2>&1"


if USE_CDM_RELEASE:

    rule convert_cdm_release:
        input:
            ckpt=_M.cdm_release,
        output:
            CDM_CKPT,
        log:
            "logs/release/convert_cdm.log",
        threads: 2
        resources:
            mem_mb=16000,
            runtime=30,
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            config=_M.cdm_release_config,
            flags=("--ema " if _M.release_ema else "") + ("--trust-pickle" if _M.trust_pickle else ""),
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "{params.cli} convert official-cdm --ckpt {input.ckpt} --config {params.config} --out {params.out} "
            "{params.flags} > {log} 2>&1"
