"""The report: tables beside the paper's numbers from a synthetic metrics tree, one-line errors, figures."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from zoomldm.report.inputs import ReportInputError
from zoomldm.report.tables import write_tables

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT / "workflow/references"
LABEL = "FID-EffNetL0 (offline stand-in)"
MAGS = ["20x", "10x", "5x", "2.5x", "1.25x"]


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_metrics(root: Path) -> Path:
    sets = [("zoomldm", "store", m) for m in MAGS] + [("zoomldm", "cdm", m) for m in MAGS] + \
           [("single_scale", "store", "20x"), ("single_scale", "store", "1.25x"), ("graikos", "store", "20x"),
            ("zoomldm_cached", "store", "5x"), ("zoomldm_cached", "store", "20x")]
    for i, (method, cond, mag) in enumerate(sets):
        _dump(root / "fid" / method / cond / f"{mag}.json",
              {"method": method, "cond": cond, "magnification": mag, "fid": 50.0 + i, "n_gen": 64,
               "n_ref": 128, "extractor": "effnet-lite0", "extractor_label": LABEL, "stand_in": True,
               "samples": "x"})
    for method in ("zoomldm", "zoomldm_unconstrained", "zoomldm_linear", "graikos"):
        _dump(root / "large_images" / f"{method}_grid4.json",
              {"method": method, "grid": 4, "size_px": 256, "n_images": 2, "clip_fid": 30.0,
               "clip_extractor": "effnet-lite0", "clip_stand_in": True,
               "clip_extractor_label": "CLIP-FID-EffNetL0 (offline stand-in)", "n_ref_large": 4,
               "crop_fid": 40.0, "crop_extractor": "effnet-lite0",
               "crop_extractor_label": LABEL, "crop_stand_in": True, "n_crops": 32, "n_ref_crops": 64,
               "seconds_per_image": 12.5, "consistency_mae": None if method == "graikos" else 27.4})
    _dump(root / "large_images" / "consistency.json",
          {"constrained_mae": 27.4, "unconstrained_mae": 35.9, "n": 2})
    for method in ("bicubic", "ldm_sr", "controlnet", "zoomldm"):
        _dump(root / "super_resolution" / f"{method}.json",
              {"method": method, "n": 4, "ssim": 0.5, "psnr": 20.0, "lpips": None,
               "lpips_note": "missing $TORCH_HOME/alexnet.pth", "convention": "Y channel, skimage"})
    for feats, mag in [("ssl", "20x"), ("zoomldm", "20x"), ("zoomldm", "5x"), ("zoomldm", "20x+5x")]:
        _dump(root / "mil" / f"{feats}_{mag}.json",
              {"features": feats,
               "encoder_label": "EfficientNet-Lite0 (offline stand-in)" if feats == "ssl" else "ZoomLDM UNet",
               "magnification": mag, "task": "slide of origin", "n_slides": 8, "n_instances": 300, "folds": 2,
               "auc_mean": 0.8, "auc_std": 0.1, "bacc_mean": 0.7, "bacc_std": 0.05, "stand_in": True})
    return root


@pytest.fixture
def metrics(tmp_path):
    return make_metrics(tmp_path / "metrics")


def test_fid_table_has_the_interface_columns_and_paper_values_in_the_right_rows(metrics, tmp_path):
    paths = write_tables(metrics, REFS, tmp_path / "tables")
    tables = ("fid_by_magnification", "large_images", "super_resolution", "mil")
    assert sorted(p.name for p in paths) == sorted(f"{t}.{e}" for t in tables for e in ("csv", "md", "tex"))
    df = pd.read_csv(tmp_path / "tables/fid_by_magnification.csv")
    assert {"method", "magnification", "fid", "paper_fid", "extractor", "n", "paper_source"} <= set(df)
    cell = lambda m, mag, col: df[(df.method == m) & (df.magnification == mag)][col].item()
    assert cell("ZoomLDM", "20x", "paper_fid") == 6.77 and cell("ZoomLDM", "1.25x", "paper_fid") == 8.74
    assert cell("ZoomLDM + CDM (uncond.)", "5x", "paper_fid") == 14.36
    assert cell("Graikos et al.", "20x", "paper_fid") == 6.98
    assert cell("Single-scale LDM", "1.25x", "paper_fid") == 39.72
    assert math.isnan(cell("Single-scale LDM", "20x", "paper_fid"))    # "n/a": Table 1's 20x SoTA is Graikos
    assert "Graikos" in cell("Single-scale LDM", "20x", "paper_source")
    assert cell("ZoomLDM", "10x", "fid") == 51.0 and cell("ZoomLDM", "10x", "n") == 64
    assert set(df.extractor) == {"effnet-lite0"} and df.stand_in.all()
    assert list(df.magnification[df.method == "ZoomLDM"]) == MAGS            # table order: 20x first
    md = (tmp_path / "tables/fid_by_magnification.md").read_text()
    tex = (tmp_path / "tables/fid_by_magnification.tex").read_text()
    assert f"{LABEL}: not comparable to the paper's Inception FID" in md
    assert "FID-EffNetL0 (offline stand-in): not comparable" in tex and "\\begin{tabular}" in tex
    assert "| ZoomLDM | 20x | 50.00 | 6.77 |" in md
    # the DeepCache variant (issue 8's patch cut) sits right below the reference, 20x first, with no paper value
    cached = df[df.model == "zoomldm_cached"]
    assert set(cached.method) == {"ZoomLDM (DeepCache: the speed cut)"} and list(cached.magnification) == ["20x", "5x"]
    assert cached.paper_fid.isna().all() and cached.fid.tolist() == [64.0, 63.0]
    assert list(df.model[:7]) == ["zoomldm"] * 5 + ["zoomldm_cached"] * 2


def test_other_tables_carry_paper_columns_and_notes(metrics, tmp_path):
    write_tables(metrics, REFS, tmp_path / "t")
    large = pd.read_csv(tmp_path / "t/large_images.csv")
    z = large[large.model == "zoomldm"].iloc[0]
    assert z.paper_clip_fid == 1.23 and z.paper_crop_fid == 14.94
    assert z.paper_size_px == 1024 and z.size_px == 256
    assert large[large.model == "graikos"].paper_clip_fid.item() == 7.43
    assert math.isnan(large[large.model == "zoomldm_unconstrained"].paper_clip_fid.item())
    assert list(large.model) == ["zoomldm", "zoomldm_linear", "zoomldm_unconstrained", "graikos"]
    assert large[large.model == "zoomldm_linear"].method.item() == "ZoomLDM (joint, linear constraint: the speed cut)"
    md = (tmp_path / "t/large_images.md").read_text()
    assert "constrained 27.40 vs unconstrained 35.90" in md and "∞-Brush" in md and "not comparable" in md
    sr = pd.read_csv(tmp_path / "t/super_resolution.csv", keep_default_na=False)
    assert list(sr.model) == ["bicubic", "ldm_sr", "controlnet", "zoomldm"]
    assert set(sr.paper_ssim) == {"n/r"} and set(sr.lpips) == {"n/c"}
    assert "alexnet.pth" in (tmp_path / "t/super_resolution.md").read_text()
    mil = pd.read_csv(tmp_path / "t/mil.csv")
    row = mil[(mil.kind == "zoomldm") & (mil.magnification == "20x+5x")].iloc[0]
    assert row.paper_subtyping_auc == 94.91 and row.paper_hrd_auc == 88.03 and row.auc == pytest.approx(80.0)
    assert math.isnan(mil[mil.kind == "ssl"].paper_subtyping_auc.item())   # the stand-in: no paper row
    mil_md = (tmp_path / "t/mil.md").read_text()
    assert "Task run here: slide of origin" in mil_md and "Paper only, not run here: UNI 20x" in mil_md
    note = "EfficientNet-Lite0 (offline stand-in): built on an offline stand-in, not the paper's encoder"
    assert note in (tmp_path / "t/mil.tex").read_text()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(fid=float("nan")), "field 'fid' is nan"),
    (lambda d: d.pop("n_gen"), "missing field(s) n_gen"),
    (lambda d: d.update(extractor=None), "field 'extractor' is null"),
])
def test_bad_metric_file_is_one_line_naming_it(metrics, tmp_path, edit, message):
    f = metrics / "fid/zoomldm/store/5x.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))
    with pytest.raises(ReportInputError) as e:
        write_tables(metrics, REFS, tmp_path / "t")
    assert str(f) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "t").exists()                    # nothing written when any input is bad


def test_empty_category_and_cli_error_are_one_line(metrics, tmp_path):
    from zoomldm.cli.main import main
    for f in (metrics / "mil").iterdir():
        f.unlink()
    res = CliRunner().invoke(main, ["report", "tables", "--metrics", str(metrics), "--references", str(REFS),
                                    "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "no metric files" in res.output and str(metrics / "mil") in res.output
    res = CliRunner().invoke(main, ["report", "tables", "--metrics", str(metrics), "--references", str(REFS),
                                    "--out", str(tmp_path / "t"), "--table", "fid_by_magnification"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [f"fid_by_magnification.{e}" for e in
                                                                   ("csv", "md", "tex")]


def test_other_ladder_has_no_paper_values(tmp_path):
    root = tmp_path / "m"
    _dump(root / "fid/zoomldm/store/2x.json",
          {"method": "zoomldm", "cond": "store", "magnification": "2x", "fid": 5.0, "n_gen": 8, "n_ref": 8,
           "extractor": "effnet-lite0", "extractor_label": LABEL, "stand_in": True, "samples": "x"})
    write_tables(root, REFS, tmp_path / "t", ("fid_by_magnification",), ladder="naip")
    df = pd.read_csv(tmp_path / "t/fid_by_magnification.csv", keep_default_na=False)
    assert df.paper_fid.item() == "n/r"


def _png(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def make_samples(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for model, cond, mag in [("zoomldm", "store", "20x"), ("zoomldm", "cdm", "20x"),
                             ("zoomldm", "store", "1.25x"), ("graikos", "store", "20x")]:
        d = root / "patches" / model / cond / mag
        d.mkdir(parents=True)
        np.save(d / "images-00000.npy", rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8))
    for variant in ("zoomldm", "zoomldm_unconstrained", "graikos"):
        _png(root / "large" / variant / "grid4" / "0.png", 64, 1)
        _png(root / "large" / variant / "grid4" / "0_guide.png", 16, 2)
    for k in range(2):
        _png(root / "sr/inputs/lr" / f"{k}.png", 8, k)
        _png(root / "sr/inputs/hr" / f"{k}.png", 32, k)
        for method in ("bicubic", "zoomldm"):
            _png(root / "sr" / method / f"{k}.png", 32, k + 5)
    return root


def test_figures_are_written(metrics, tmp_path):
    from zoomldm.cli.main import main
    samples = make_samples(tmp_path / "samples")
    out = tmp_path / "figs"
    res = CliRunner().invoke(main, ["report", "figures", "--metrics", str(metrics), "--references", str(REFS),
                                    "--samples", str(samples), "--out", str(out), "--k", "4"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fid_vs_magnification.png", "large_grid4.png", "samples_1_25x.png", "samples_20x.png",
                     "sr_examples.png"]
    for n in names:
        img = np.asarray(Image.open(out / n).convert("RGB"))
        assert img.shape[0] > 100 and img.std() > 5, n            # a real, non-blank figure
    (samples / "sr/zoomldm/1.png").unlink()
    (samples / "sr/zoomldm/0.png").unlink()
    with pytest.raises(ReportInputError, match="no test pair"):
        from zoomldm.report.figures import sr_examples
        sr_examples(samples, out / "x.png")


def test_dataset_table_gets_the_papers_training_patches_row():
    from zoomldm.data.summary import PAPER_ROW, with_paper_row
    df = pd.DataFrame([{"slide": "s0", "status": "ok", "20x": 10, "1.25x": 1, "reason": ""},
                       {"slide": "total", "status": "", "20x": 10, "1.25x": 1, "reason": ""}])
    out, note = with_paper_row(df, "brca", REFS / "dataset.csv")
    paper = out[out.slide == PAPER_ROW].iloc[0]
    assert paper["20x"] == 12_000_000 and paper["1.25x"] == 57_000 and "Table 1" in paper["reason"]
    assert list(out.slide[:2]) == ["s0", "total"] and "TCGA-BRCA" in note
    naip, _ = with_paper_row(df.rename(columns={"20x": "1x", "1.25x": "2x"}), "naip", REFS / "dataset.csv")
    assert naip.iloc[-1]["1x"] == "n/r"
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        with_paper_row(df, "brca", REFS / "nothing.csv")
