# Data acquisition for TCGA-BRCA: the slides of a GDC manifest, downloaded through the GDC HTTP API with
# resume and md5 verification (zoomldm/data/gdc.py). Active only when the manifest exists, at
# resources/<dataset.name>/gdc_manifest.tsv (resources/brca/gdc_manifest.tsv for brca.yaml); the files go to
# the folder of dataset.inputs (resources/brca/slides/). One job per file: a rerun resumes or skips each one.
# The jobs run where Snakemake runs (localrules): compute nodes of many clusters cannot reach the internet.
# `snakemake gdc_slides --cores 4` downloads them all.
import re as _re

from zoomldm.data.gdc import GDCError, read_manifest

GDC_MANIFEST = getattr(CFG.dataset, "gdc_manifest", None) or f"resources/{CFG.dataset.name}/gdc_manifest.tsv"

if not CFG.demo_data and os.path.isfile(GDC_MANIFEST):
    GDC_DIR = os.path.dirname(CFG.dataset.inputs) or "."
    if _re.search(r"[*?\[]", GDC_DIR):
        raise WorkflowError(
            f"dataset.inputs {CFG.dataset.inputs}: the slide folder must not hold wildcards to download "
            f"the GDC manifest {GDC_MANIFEST} into it"
        )
    try:
        GDC_FILES = {e.filename: e for e in read_manifest(GDC_MANIFEST)}
    except GDCError as e:
        raise WorkflowError(str(e)) from None

    localrules:
        fetch_gdc,
        gdc_slides,

    rule fetch_gdc:
        input:
            ancient(GDC_MANIFEST),
        output:
            f"{GDC_DIR}/{{gdc_file}}",
        log:
            "logs/data/fetch_gdc/{gdc_file}.log",
        wildcard_constraints:
            gdc_file="|".join(_re.escape(name) for name in GDC_FILES),
        conda:
            ENV
        params:
            cli=ZOOMLDM,
            file_id=lambda wc: GDC_FILES[wc.gdc_file].id,
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            "{params.cli} fetch gdc --manifest {input} --out {params.out} --only {params.file_id} "
            "--no-progress > {log} 2>&1"

    rule gdc_slides:
        input:
            [f"{GDC_DIR}/{name}" for name in GDC_FILES],
