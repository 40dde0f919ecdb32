"""The Snakemake workflow: lint, dry-run plans for the paper configs, config errors, and (slow) a real run."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def _run(args, cwd, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(SNAKEMAKE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _config(tmp_path, base: str, **dataset) -> Path:
    cfg = yaml.safe_load((ROOT / "workflow/configs" / base).read_text())
    cfg["dataset"].update(dataset)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lint_is_clean():
    res = _run(["--lint"], cwd=ROOT)
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize("base, ext", [("brca.yaml", "svs"), ("naip.yaml", "tif")])
def test_dry_run_plans_the_data_stage_for_a_directory_of_slides(tmp_path, base, ext):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        (slides / f"S{i}.{ext}").touch()
    cfg = _config(tmp_path, base, inputs=f"{slides}/*.{ext}")
    res = _run(["dataset", "-n", "--configfile", str(cfg)], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    jobs = {l.split()[0]: int(l.split()[1]) for l in out.splitlines()
            if len(l.split()) == 2 and l.split()[1].isdigit()}
    assert jobs["extract_slide"] == 3 and jobs["build_store"] == 1 and jobs["dataset_summary"] == 1


def test_bad_config_key_is_one_clear_line(tmp_path):
    cfg = _config(tmp_path, "brca.yaml", inputs="nothing/*.svs", patch_pxx=3)
    res = _run(["-n", "--configfile", str(cfg)], cwd=tmp_path)
    assert res.returncode != 0
    assert "config key 'dataset.patch_pxx' is not known (did you mean 'patch_px'?)" in res.stdout + res.stderr


def test_no_matching_slides_is_one_clear_line(tmp_path):
    cfg = _config(tmp_path, "brca.yaml", inputs=f"{tmp_path}/none/*.svs")
    res = _run(["-n", "--configfile", str(cfg)], cwd=tmp_path)
    assert res.returncode != 0 and "dataset.inputs matches no file" in res.stdout + res.stderr


@pytest.mark.slow
def test_dataset_stage_runs_end_to_end(tmp_path):
    from conftest import make_he
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, (h, w) in enumerate([(160, 192), (128, 128)]):
        Image.fromarray(make_he(h, w, seed=i)[0]).save(slides / f"slide{i}.png")
    (slides / "broken.png").write_bytes(b"not an image")
    cfg = _config(tmp_path, "demo.yaml", inputs=f"{slides}/*.png", patch_px=32,
                  magnifications=["20x", "10x", "5x"], stride_fraction_by_mag={})
    cfg_data = yaml.safe_load(cfg.read_text())
    cfg_data["demo_data"] = None
    cfg.write_text(yaml.safe_dump(cfg_data))
    res = _run(["dataset", "--cores", "2", "--configfile", str(cfg)], cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (tmp_path / "results/tables/dataset.csv").read_text().splitlines()
    assert table[0].startswith("slide,status,20x,10x,5x")
    rows = {r.split(",")[0]: r for r in table[1:]}
    assert rows["broken"].split(",")[1] == "failed" and "broken.png" in rows["broken"]
    assert rows["slide0"].split(",")[1] == "ok"
    assert (tmp_path / "results/figures/dataset_montage.png").stat().st_size > 1000
    img = np.asarray(Image.open(tmp_path / "results/figures/dataset_montage.png"))
    assert img.std() > 5                                       # not a blank figure


def test_released_weights_replace_training_in_the_plan(tmp_path):
    """models.zoomldm_release / cdm_release: no ZoomLDM, CDM or autoencoder training job; the converted release
    is what the sampling jobs read (issue #7)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "S0.svs").touch()
    rel = tmp_path / "release" / "brca"
    rel.mkdir(parents=True)
    for name in ("weights.ckpt", "config.yaml", "cdm.pt"):
        (rel / name).touch()
    cfg = yaml.safe_load((ROOT / "workflow/configs/brca.yaml").read_text())
    cfg["dataset"]["inputs"] = f"{slides}/*.svs"
    cfg["models"].update(vq_checkpoint=None, zoomldm_release=str(rel / "weights.ckpt"),
                         zoomldm_release_config=str(rel / "config.yaml"), cdm_release=str(rel / "cdm.pt"))
    cfg["eval"]["mil"]["labels"] = str(rel / "labels.csv")
    (rel / "labels.csv").write_text("slide,label\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _run(["-n", "-p", "--configfile", str(path)], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    jobs = {l.split()[0]: int(l.split()[1]) for l in out.splitlines()
            if len(l.split()) == 2 and l.split()[1].isdigit()}
    assert jobs["convert_release"] == 1 and jobs["convert_cdm_release"] == 1
    assert not {"train_ldm", "train_cdm", "train_autoencoder"} & set(jobs)
    assert jobs["train_graikos"] == 1 and jobs["sample_large"] > 0           # baselines still train
    fit = "resources/samples/brca/large/zoomldm_linear/linear_vq.safetensors"
    assert jobs["fit_linear_vq"] == 1 and f"--out {fit}" in out               # the cut's fit: once per run ...
    assert out.count(f"--linear-vq {fit}") == 120                             # ... loaded by its 100 + 20 jobs
    release = "resources/runs/brca/release/zoomldm.safetensors"
    assert jobs["train_controlnet"] == 1 and f"--zoomldm {release}" in out   # ... on the released ZoomLDM
    assert "train ldm --config" not in out and f"--ckpt {release}" in out     # sampling reads the release
    assert f"--vq {release}" in out                                           # ... and so does encode_latents
    assert "--cdm-ckpt resources/runs/brca/release/cdm.safetensors" in out or "cdm" not in cfg["sample"]["patches"]["cond"]


def test_the_deepcache_variant_samples_every_patch_magnification_beside_the_reference(tmp_path):
    """sample.patches.deepcache_variant: N adds the zoomldm_cached patch sets (store conditioning, every patch
    magnification, `--cache-every N` and the forecast flag), sampled shard by shard and FID-evaluated like the reference's; no other
    patch job gets the flag."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "S0.svs").touch()
    cfg = yaml.safe_load((ROOT / "workflow/configs/brca.yaml").read_text())
    cfg["dataset"]["inputs"] = f"{slides}/*.svs"
    cfg["models"]["vq_checkpoint"] = None
    cfg["eval"]["mil"]["labels"] = str(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("slide,label\n")
    cfg["sample"]["patches"]["deepcache_variant"] = 3
    cfg["sample"]["patches"]["cache_forecast"] = True
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _run(["-n", "-p", "--configfile", str(path)], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    from zoomldm.config import load_config
    c = load_config(path)
    mags = c.sample.patches.magnifications or [m.name for m in c.dataset.magnification_list()]
    shards = -(-c.sample.patches.n_per_mag // c.sample.patches.shard_size)
    assert len(mags) == 8 and shards == 10
    cached = [l for l in out.splitlines() if "sample patches" in l and "/zoomldm_cached/" in l]
    # one job per shard and the merge job of each magnification
    assert len(cached) == len(mags) * (shards + 1)
    assert all("--cache-every 3 --cache-branch 0 --cache-forecast " in l and "--cond store" in l for l in cached)
    assert out.count("--cache-every") == len(cached)
    assert all(f"resources/samples/brca/patches/zoomldm_cached/store/{m}" in out for m in mags)
    assert sum(f"results/metrics/fid/zoomldm_cached/store/{m}.json" in out for m in mags) == len(mags)


def test_a_cached_reference_is_one_clear_line(tmp_path):
    """sample.patches.cache_every would put DeepCache under the rows the tables set beside the paper's (labelled
    "ZoomLDM"): the workflow refuses it and names the variant key."""
    cfg = yaml.safe_load((ROOT / "workflow/configs/demo.yaml").read_text())
    cfg["sample"]["patches"]["cache_every"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _run(["-n", "--configfile", str(path)], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "config key 'sample.patches.cache_every'" in out and "deepcache_variant" in out


def test_params_of_the_reference_large_jobs_ignore_the_cut_settings():
    """A change of sample.large.cut reruns only the zoomldm_linear jobs: `section(..., drop=[...])` of
    common.smk leaves the sub-key out of the other rules' params (their rerun trigger)."""
    import ast
    import json

    from zoomldm.config import load_config, to_dict
    src = (ROOT / "workflow/rules/common.smk").read_text()       # Snakemake syntax: cut the function out
    start = src.index("def section(")
    fn = ast.parse(src[start:src.index("\n\n\n", start)]).body[0]
    ns = {"to_dict": to_dict}
    a, b = load_config(ROOT / "workflow/configs/demo.yaml"), load_config(ROOT / "workflow/configs/demo.yaml")
    b.sample.large.cut.inner_steps = 3
    sections = {}
    for name, cfg in (("a", a), ("b", b)):
        ns["CFG"] = cfg
        exec(compile(ast.Module([fn], []), "common.smk", "exec"), ns)
        sections[name] = (ns["section"]("sample.seed", "sample.large", drop=["sample.large.cut"]),
                          ns["section"]("sample.seed", "sample.large"))
    assert sections["a"][0] == sections["b"][0] and "cut" not in json.loads(sections["a"][0])["sample.large"]
    assert sections["a"][1] != sections["b"][1]
    smk = (ROOT / "workflow/rules/sample.smk").read_text()
    assert smk.count('drop=["sample.large.cut"]') == 2 and 'wc.variant == "zoomldm_linear" else ["sample.large.cut"]' in smk
