# Config validation (one-line errors from zoomldm.config, then the generated JSON schema) and shared paths.
import glob as _glob
import os
import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)
from zoomldm.config import ConfigError, config_from_dict, to_dict  # noqa: E402
from zoomldm.data.demo import demo_paths  # noqa: E402
from zoomldm.data.extract import slide_id  # noqa: E402

try:
    CFG = config_from_dict(config)
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from None
validate(config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"))

# The resolved config (defaults filled in, --config overrides applied) is what every CLI call reads. Rules take
# it as ancient() input and declare the sections they depend on as params, so editing one section (say
# train.cdm) reruns only the jobs that use it (Snakemake's params rerun trigger).
_resolved = yaml.safe_dump(to_dict(CFG), sort_keys=True)
CONFIG = ".snakemake/zoomldm/config.yaml"
os.makedirs(os.path.dirname(CONFIG), exist_ok=True)
if not os.path.exists(CONFIG) or open(CONFIG).read() != _resolved:
    with open(CONFIG, "w") as f:
        f.write(_resolved)


def section(*keys, drop=()):
    """The resolved values of config sections, as a stable string for a rule's params (a change reruns the
    rule's jobs); `drop` names sub-keys the rule does not read, e.g. "sample.large.cut"."""
    import json

    data = to_dict(CFG)
    out = {}
    for key in keys:
        node = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    for key in drop:                        # a direct sub-key of a listed section
        parent, _, last = key.rpartition(".")
        out[parent] = {k: v for k, v in out[parent].items() if k != last}
    return json.dumps(out, sort_keys=True)


# Run the CLI from this checkout whether or not the package is installed (conda envs hold dependencies only).
ZOOMLDM = f"PYTHONPATH={workflow.basedir}${{PYTHONPATH:+:$PYTHONPATH}} python -m zoomldm"
ENV = os.path.join(workflow.basedir, "environment.yml")


def launcher(wildcards, resources):
    """The CLI, under torchrun when a job holds several GPUs (set-resources: gpu: N in a cluster profile).
    DDP keeps the global batch (train.<what>.batch_size) whatever N is."""
    n = int(getattr(resources, "gpu", 0) or 0)
    if n > 1:
        return (
            f"PYTHONPATH={workflow.basedir}${{PYTHONPATH:+:$PYTHONPATH}} "
            f"torchrun --standalone --nproc_per_node {n} -m zoomldm"
        )
    return ZOOMLDM

STORE = f"{CFG.dataset.store_root}/{CFG.dataset.name}"
RUNS = f"resources/runs/{CFG.dataset.name}"
# Released weights instead of training (models.zoomldm_release / cdm_release): the converted official release
# is the ZoomLDM (and its VQ-f4 encodes the store unless models.vq_checkpoint says otherwise) or the CDM that
# sampling and evaluation use; the matching training jobs are not in the DAG.
RELEASE = f"resources/runs/{CFG.dataset.name}/release"
USE_RELEASE = CFG.models.zoomldm_release is not None
USE_CDM_RELEASE = CFG.models.cdm_release is not None
LDM_CKPT = f"{RELEASE}/zoomldm.safetensors" if USE_RELEASE else f"{RUNS}/ldm/model.safetensors"
CDM_CKPT = f"{RELEASE}/cdm.safetensors" if USE_CDM_RELEASE else f"{RUNS}/cdm/final.safetensors"
VQ_CHECKPOINT = CFG.models.vq_checkpoint or (
    LDM_CKPT if USE_RELEASE else f"{RUNS}/autoencoder/final.safetensors"
)
TRAIN_AUTOENCODER = not (CFG.models.vq_checkpoint or USE_RELEASE)
_SINGLE = CFG.train.single_scale.magnifications or [CFG.dataset.magnification_list()[0].name]
TRAIN_RUNS = (
    ([f"{RUNS}/autoencoder/final.safetensors"] if TRAIN_AUTOENCODER else [])
    + ([] if USE_RELEASE else [f"{RUNS}/ldm/model.safetensors"])
    + [f"{RUNS}/graikos/model.safetensors"]
    + ([] if USE_CDM_RELEASE else [f"{RUNS}/cdm/final.safetensors"])
    + [f"{RUNS}/single_scale/{m}/model.safetensors" for m in _SINGLE]
    + [f"{RUNS}/ldm_sr/model.safetensors", f"{RUNS}/controlnet/model.safetensors"]
)
PARTS = f"{CFG.dataset.store_root}/{CFG.dataset.name}.parts"

if CFG.demo_data:
    _inputs = [str(p) for p in demo_paths(CFG.demo_data)]
elif CFG.dataset.gdc_manifest:
    from zoomldm.data.gdc import read_manifest  # noqa: E402

    _inputs = [
        os.path.join(os.path.dirname(CFG.dataset.inputs), e.filename)
        for e in read_manifest(CFG.dataset.gdc_manifest)
    ]
else:
    _inputs = sorted(_glob.glob(CFG.dataset.inputs))
    if not _inputs:
        raise WorkflowError(f"dataset.inputs matches no file: {CFG.dataset.inputs}")
SLIDES = {slide_id(p): p for p in _inputs}
if len(SLIDES) != len(_inputs):
    raise WorkflowError("slide names (file names without extension) must be unique in dataset.inputs")


wildcard_constraints:
    slide="[^/]+",


# Input functions of the evaluation rules (eval.smk); they read names that sample.smk and eval.smk define.
def large_eval_inputs(wc):
    """eval_large: the images' JSONs, the Crop-FID reference when shared with FID, and (for the variants
    after the first) the first job's output, so one job fills the whole-image reference cache."""
    g = int(wc.grid)
    files = [f"{SAMPLES}/large/{wc.variant}/grid{g}/{i}.json" for i in range(N_LARGE[g])]
    if _E.large.crop_extractor == _E.fid.extractor:          # Crop-FID reuses the base magnification's stats
        files.append(f"{FID_STATS}/patch-{_slug(_DATA_MAGS[0])}-{_E.fid.extractor}.npz")
    if wc.variant != "zoomldm":                               # the first job fills the whole-image cache
        files.append(f"{METRICS}/large_images/zoomldm_grid{g}.json")
    return files


def mil_feature_files(wc):
    """eval_mil: the feature files of a set (one magnification, or several joined by '_' = fused)."""
    by_slug = {m.replace(".", "_"): m for m in _MIL_MAGS}
    mags = [by_slug[wc.set]] if wc.set in by_slug else list(_MIL_MAGS)
    return [f"{_MIL_FEATS}/{wc.features}_{m}.npz" for m in mags]
