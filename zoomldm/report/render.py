"""Writing one table: csv (every column, full precision), md and tex (display columns, rounded, notes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Table:
    name: str                       # file stem: results/tables/<name>.{csv,md,tex}
    caption: str
    frame: pd.DataFrame             # every column goes to the csv
    display: list[str]              # columns shown in md/tex
    notes: list[str] = field(default_factory=list)   # footnote lines (stand-in labels, n/r, n/a, ...)
    digits: dict[str, int] = field(default_factory=dict)  # decimals per display column (default 2)
    extra_md: list[str] = field(default_factory=list)     # lines after the notes (e.g. a second small table)


def _cell(v, digits: int) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _display(t: Table) -> pd.DataFrame:
    df = t.frame[t.display].copy().astype(object)
    for c in t.display:
        df[c] = [_cell(v, t.digits.get(c, 2)) for v in t.frame[c]]
    return df


def markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


_TEX_UNICODE = {"²": "$^2$", "∞": "$\\infty$", "×": "$\\times$", "±": "$\\pm$", "→": "$\\to$", "≥": "$\\geq$",
                "≤": "$\\leq$", "~": "\\textasciitilde{}",
                "§": "\\S{}", "|": "$|$"}
_TEX_SPECIAL = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                "{": "\\{", "}": "\\}", "^": "\\textasciicircum{}"}


def tex_escape(text: str) -> str:
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))
    return "".join(_TEX_UNICODE.get(ch, ch) for ch in out)


def latex(t: Table) -> str:
    df = _display(t)
    df = df.map(tex_escape)
    df.columns = [tex_escape(c) for c in df.columns]
    body = df.to_latex(index=False, escape=False, caption=tex_escape(t.caption), label=f"tab:{t.name}")
    notes = "".join(f"\\par\\footnotesize {tex_escape(n)}\n" for n in t.notes + t.extra_md)
    return body.replace("\\end{table}", notes + "\\end{table}")


def write(t: Table, out_dir: Path | str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / t.name
    paths = [stem.with_suffix(s) for s in (".csv", ".md", ".tex")]
    t.frame.to_csv(paths[0], index=False)
    md = [t.caption, "", markdown(_display(t)), ""] + [f"- {n}" for n in t.notes]
    if t.extra_md:
        md += [""] + t.extra_md
    paths[1].write_text("\n".join(md) + "\n")
    paths[2].write_text(latex(t))
    return paths
