"""DESIGN.md §9: imports point down only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Layer of each top-level package/module; a module may import only from its own layer or lower ones.
LAYER = {"mags": 0, "config": 0, "pretrained": 0, "effnet_lite": 0, "diffusion": 0,
         "data": 1, "models": 1, "training": 2, "sampling": 3,
         "metrics": 2, "mil": 3, "baselines": 3, "cli": 4, "report": 4}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] == "baselines":
        return LAYER["baselines"]
    if parts[0] == "zoomldm" and len(parts) > 1:
        return LAYER.get(parts[1])
    return None


def test_imports_point_down():
    bad = []
    for path in list((ROOT / "zoomldm").rglob("*.py")) + list((ROOT / "baselines").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        own = _layer(".".join(rel.parts))
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                target = _layer(name)
                if target is not None and target > own:
                    bad.append(f"{rel} imports {name}")
    assert not bad, bad
