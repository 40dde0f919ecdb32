"""`zoomldm fetch`: real data sets. `gdc` downloads slides listed in a GDC manifest (resumable, md5-checked);
`labels` turns a clinical table into the (slide, label) CSV of the MIL tasks."""
from __future__ import annotations

import csv
import glob
import logging
from pathlib import Path

import click

log = logging.getLogger("zoomldm.fetch")


@click.group()
def fetch() -> None:
    """Real data sets: TCGA slides from the GDC, slide labels from clinical tables."""


@fetch.command("gdc")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False),
              help="GDC manifest TSV (columns id, filename, md5, size, state).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the files.")
@click.option("--base-url", default="https://api.gdc.cancer.gov/data", show_default=True,
              envvar="ZOOMLDM_GDC_URL",
              help="GDC data endpoint (env ZOOMLDM_GDC_URL); <base-url>/<id> is fetched.")
@click.option("--only", multiple=True, help="Download only this file id or file name (repeatable).")
@click.option("--retries", default=5, show_default=True,
              help="Retries in a row without progress before failing.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds without data before a retry.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def gdc_cmd(manifest: str, out_dir: str, base_url: str, only: tuple[str, ...], retries: int, timeout: float,
            progress: bool) -> None:
    """Download the files of a GDC manifest into OUT, resuming partial downloads and checking each md5.

    A file is written to OUT/<filename>.part and renamed to OUT/<filename> once its md5 matches; a rerun
    continues a .part file with an HTTP Range request and skips finished files. A file whose md5 differs is
    reported by name and its .part deleted."""
    from zoomldm.data.gdc import download_file, read_manifest, select

    entries = select(read_manifest(manifest), only)
    log.info("%d file(s), %.1f GB, from %s", len(entries), sum(e.size for e in entries) / 1e9, base_url)
    for e in entries:
        click.echo(str(download_file(e, out_dir, base_url=base_url, retries=retries, timeout=timeout,
                                     progress=progress)))


# Values that clinical tables use for "no value" (GDC: '--' and "'--"; cBioPortal: '[Not Available]', 'NA').
MISSING = {"", "--", "'--", "na", "nan", "null", "none", "[not available]", "[not applicable]",
           "[unknown]", "[not evaluated]", "[discrepancy]", "not reported", "unknown"}
# Columns that hold the case / patient / sample barcode in GDC and cBioPortal clinical tables, in order.
ID_COLUMNS = ("cases.submitter_id", "case_submitter_id", "submitter_id", "SAMPLE_ID", "PATIENT_ID",
              "bcr_patient_barcode", "slide", "slide_id")


def read_clinical(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """A tab-separated clinical table; lines starting with '#' (cBioPortal's 4 header lines) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical table {path} does not exist")
    lines = [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no rows (expected a tab-separated table with a header line)")
    reader = csv.DictReader(lines, delimiter="\t")
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def build_labels(columns: list[str], rows: list[dict[str, str]], column: str, id_column: str | None,
                 mapping: dict[str, str], threshold: float | None, slides: list[str] | None,
                 source: str = "clinical table") -> list[tuple[str, str]]:
    """(slide, label) pairs. A slide matches the clinical id that is its longest prefix (a TCGA slide
    `TCGA-A1-A0SB-01Z-00-DX1` matches the patient `TCGA-A1-A0SB` or the sample `TCGA-A1-A0SB-01`)."""
    if column not in columns:
        raise ValueError(f"{source}: no column {column!r} (columns: {', '.join(columns)})")
    if id_column is None:
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        if id_column is None:
            raise ValueError(f"{source}: no id column among {', '.join(ID_COLUMNS)}; "
                             f"name one with --id-column")
    elif id_column not in columns:
        raise ValueError(f"{source}: no column {id_column!r} (columns: {', '.join(columns)})")
    labels: dict[str, str] = {}
    skipped = 0
    for r in rows:
        key, raw = (r.get(id_column) or "").strip(), (r.get(column) or "").strip()
        if not key or raw.lower() in MISSING:
            skipped += 1
            continue
        if threshold is not None:
            try:
                label = "1" if float(raw) >= threshold else "0"
            except ValueError:
                raise ValueError(f"{source}: {id_column}={key}: {column}={raw!r} is not a number "
                                 f"(--threshold needs a numeric column)") from None
        elif mapping:
            if raw not in mapping:
                skipped += 1
                continue
            label = mapping[raw]
        else:
            label = raw
        if labels.get(key, label) != label:
            raise ValueError(f"{source}: {id_column}={key} has two labels: {labels[key]!r} and {label!r}")
        labels[key] = label
    log.info("%d id(s) labelled from %s; %d row(s) without a usable %s", len(labels), column, skipped, column)
    if slides is None:
        return sorted(labels.items())
    lengths = sorted({len(k) for k in labels}, reverse=True)
    out, unmatched = [], []
    for s in slides:
        hit = next((s[:n] for n in lengths if s[:n] in labels), None)
        if hit is None:
            unmatched.append(s)
        else:
            out.append((s, labels[hit]))
    if unmatched:
        log.warning("%d slide(s) have no label and are left out: %s", len(unmatched),
                    ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else ""))
    return out


@fetch.command("labels")
@click.option("--clinical", required=True, type=click.Path(dir_okay=False),
              help="Clinical TSV from the GDC (clinical.tsv) or cBioPortal (data_clinical_*.txt).")
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False),
              help="CSV with columns slide,label.")
@click.option("--column", required=True, help="Column holding the label, e.g. diagnoses.primary_diagnosis, "
              "ONCOTREE_CODE, or a numeric score with --threshold.")
@click.option("--id-column", default=None, help="Column with the case/sample barcode (default: the first of "
              + ", ".join(ID_COLUMNS) + ").")
@click.option("--map", "maps", multiple=True, metavar="VALUE=LABEL",
              help="Keep only rows whose value is listed and write LABEL (repeatable).")
@click.option("--threshold", type=float, default=None,
              help="Numeric column: label 1 when value >= T, else 0.")
@click.option("--slides", "slides_glob", default=None, help="Glob of slide files to label (file name without "
              "extension = slide name); default: one row per id of the table.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False),
              help="Label the slides of this GDC manifest instead of --slides.")
def labels_cmd(clinical: str, out_csv: str, column: str, id_column: str | None, maps: tuple[str, ...],
               threshold: float | None, slides_glob: str | None, manifest: str | None) -> None:
    """Write the (slide, label) CSV of a MIL task from a clinical table, by one column.

    \b
    IDC vs ILC (GDC clinical.tsv):
      --column diagnoses.primary_diagnosis
      --map "Infiltrating duct carcinoma, NOS=IDC" --map "Lobular carcinoma, NOS=ILC"
    HRD (a table with an HRD score column): --column HRD_score --threshold 42
    """
    from zoomldm.data.extract import slide_id

    if maps and threshold is not None:
        raise ValueError("use either --map or --threshold, not both")
    mapping = {}
    for m in maps:
        value, sep, label = m.rpartition("=")
        if not sep or not value or not label:
            raise ValueError(f"--map {m!r}: expected VALUE=LABEL")
        mapping[value] = label
    if slides_glob and manifest:
        raise ValueError("use either --slides or --manifest, not both")
    slides = None
    if slides_glob:
        paths = sorted(glob.glob(slides_glob))
        if not paths:
            raise FileNotFoundError(f"--slides {slides_glob} matches no file")
        slides = [slide_id(p) for p in paths]
    elif manifest:
        from zoomldm.data.gdc import read_manifest
        slides = [slide_id(e.filename) for e in read_manifest(manifest)]
    columns, rows = read_clinical(clinical)
    pairs = build_labels(columns, rows, column, id_column, mapping, threshold, slides, source=clinical)
    if not pairs:
        raise ValueError(f"{clinical}: no slide got a label from column {column!r}")
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label"])
        writer.writerows(pairs)
    counts: dict[str, int] = {}
    for _, label in pairs:
        counts[label] = counts.get(label, 0) + 1
    click.echo(f"{out}: {len(pairs)} slides; " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))

