"""Download TCGA slides listed in a GDC manifest through the GDC HTTP API, resumably and checksum-verified.

A GDC manifest (the "Manifest" download of the GDC Data Portal cart, `gdc-client`'s input) is a TSV with the
header `id filename md5 size state`. Each file is fetched from `<base_url>/<id>` (the GDC API's data endpoint,
docs.gdc.cancer.gov/API/Users_Guide/Downloading_Files) into `<out>/<filename>.part`. An interrupted transfer
continues from the bytes already on disk with an HTTP `Range: bytes=<n>-` request, as gdc-client resumes its
`.partial` files; a server that ignores or refuses the Range header makes the file start again from byte 0.
Once the `.part` file has the manifest's size its MD5 is compared with the manifest's, and only then is it
renamed to `<out>/<filename>` (atomic `os.replace`). So a file under its final name was verified, and a
rerun skips it when its size matches the manifest. Only open-access files (TCGA diagnostic slides are) can be
fetched: no authentication token is sent.

On an MD5 mismatch the `.part` file is deleted: resuming from a corrupt prefix could never verify, so the next
run starts that file from the first byte. Network errors and HTTP 408/429/5xx are retried with exponential
backoff, at most `retries` times in a row without progress (a failure after new bytes arrived counts as the
first). Every error is one line naming the file.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger("zoomldm.data.gdc")

GDC_DATA_URL = "https://api.gdc.cancer.gov/data"
MANIFEST_COLUMNS = ("id", "filename", "md5", "size")   # `state` is optional (gdc-client ignores it too)
CHUNK = 1 << 20
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Retried: HTTP errors (those in _RETRY_STATUS), DNS/refused (URLError), resets, timeouts, TLS errors, and
# connections closed mid-transfer. Local errors (disk full, permissions) are not: they fail at once.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                   ssl.SSLError)


class GDCError(ValueError):
    """A manifest, transfer or checksum problem; the message is one line naming the file."""


class ManifestError(GDCError):
    pass


class ChecksumError(GDCError):
    pass


class DownloadError(GDCError):
    pass


@dataclass(frozen=True)
class ManifestEntry:
    id: str          # GDC file UUID
    filename: str
    md5: str         # lower-case hex
    size: int        # bytes
    state: str = ""


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parse a GDC manifest TSV; wrong columns, sizes or duplicate names give one-line ManifestErrors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GDC manifest {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ManifestError(f"{path}: empty GDC manifest (expected the header: id filename md5 size state)")
    header = [c.strip() for c in rows[0]]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"{path}: GDC manifest lacks column(s) {', '.join(missing)} "
                            f"(header is: {' '.join(header)}; expected id filename md5 size state)")
    col = {c: header.index(c) for c in header}
    entries, seen = [], set()
    for line, r in enumerate(rows[1:], start=2):
        if len(r) < len(header):
            raise ManifestError(f"{path}:{line}: {len(r)} fields, the header has {len(header)}")
        get = lambda c: r[col[c]].strip()                                     # noqa: E731
        name, md5 = get("filename"), get("md5").lower()
        if not name or "/" in name or name in (".", ".."):
            raise ManifestError(f"{path}:{line}: bad filename {name!r}")
        if len(md5) != 32 or any(ch not in "0123456789abcdef" for ch in md5):
            raise ManifestError(f"{path}:{line}: {name}: md5 {get('md5')!r} is not 32 hex digits")
        try:
            size = int(get("size"))
        except ValueError:
            raise ManifestError(f"{path}:{line}: {name}: size {get('size')!r} is not an integer") from None
        if name in seen:
            raise ManifestError(f"{path}:{line}: filename {name} appears twice")
        seen.add(name)
        entries.append(ManifestEntry(get("id"), name, md5, size, get("state") if "state" in col else ""))
    return entries


def select(entries: list[ManifestEntry], only: Iterable[str] | None) -> list[ManifestEntry]:
    """The entries whose id or filename is in `only` (all when `only` is empty); unknown names are errors."""
    only = list(only or [])
    if not only:
        return entries
    by_key = {e.id: e for e in entries} | {e.filename: e for e in entries}
    unknown = [k for k in only if k not in by_key]
    if unknown:
        raise ManifestError(f"not in the manifest: {', '.join(unknown)}")
    picked = {by_key[k].filename: by_key[k] for k in only}
    return [e for e in entries if e.filename in picked]


def _md5_of(path: Path, h=None):
    h = h or hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h


class _Restart(Exception):
    """The server ignored or misanswered our Range request: start the file again from byte 0."""


def download_file(entry: ManifestEntry, out_dir: str | Path, base_url: str = GDC_DATA_URL, retries: int = 5,
                  backoff: float = 2.0, max_backoff: float = 60.0, timeout: float = 60.0,
                  progress: bool = True) -> Path:
    """Fetch one manifest entry into out_dir/<filename>, resuming a `.part` file; returns the final path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, part = out_dir / entry.filename, out_dir / f"{entry.filename}.part"
    if final.is_file() and final.stat().st_size == entry.size:
        log.info("%s: already downloaded", entry.filename)
        return final
    url = f"{base_url.rstrip('/')}/{entry.id}"
    failures = 0
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        if offset > entry.size:
            log.warning("%s: partial file larger than the manifest size; starting again", entry.filename)
            part.unlink()
            offset = 0
        try:
            if offset < entry.size:
                _transfer(entry, url, part, offset, timeout, progress)
            break
        except _Restart as e:
            part.unlink(missing_ok=True)
            failures += 1
            if failures > retries:
                raise DownloadError(f"{entry.filename}: cannot resume from {url}: {e}") from None
            log.warning("%s: %s; starting again from byte 0", entry.filename, e)
        except _NETWORK_ERRORS as e:
            status = e.code if isinstance(e, urllib.error.HTTPError) else None
            if status is not None and status not in _RETRY_STATUS:
                raise DownloadError(f"{entry.filename}: HTTP {status} {e.reason} from {url}") from None
            now = part.stat().st_size if part.is_file() else 0
            failures = 1 if now > offset else failures + 1
            if failures > retries:
                raise DownloadError(f"{entry.filename}: download failed after {retries} retries without "
                                    f"progress ({now} of {entry.size} bytes in {part.name}): "
                                    f"{_describe(e)}") from None
            wait = min(max_backoff, backoff * 2 ** max(failures - 1, 0))
            log.warning("%s: %s at byte %d; retrying in %.1f s", entry.filename, _describe(e), now, wait)
            time.sleep(wait)
    _verify_and_rename(entry, part, final)
    return final


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"{type(e.reason).__name__}: {e.reason}"
    if isinstance(e, http.client.IncompleteRead):
        return "connection closed mid-transfer"
    if isinstance(e, socket.timeout):
        return "timed out"
    return " ".join(f"{type(e).__name__}: {e}".split())


def _transfer(entry: ManifestEntry, url: str, part: Path, offset: int, timeout: float,
              progress: bool) -> None:
    """Append the bytes from `offset` to the end of the file to `part` (one HTTP request)."""
    headers = {"User-Agent": "zoomldm-bench"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:           # range not satisfiable: our prefix does not fit this file
            raise _Restart(f"server refused to resume at byte {offset} (HTTP 416)") from None
        raise
    with resp:
        if offset and resp.status != 206:
            raise _Restart(f"server ignored the Range request (HTTP {resp.status})")
        if offset:
            first = resp.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
            if first != str(offset):
                raise _Restart(f"server answered Content-Range {resp.headers.get('Content-Range')!r}")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=entry.size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=entry.filename[:40], leave=False)
        try:
            with open(part, "ab") as f:
                while block := resp.read(CHUNK):
                    f.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    # http.client returns b"" rather than raising when a connection closes before Content-Length bytes
    # arrived (read(amt) keeps that for compatibility), so a short file here is an interrupted transfer.
    got = part.stat().st_size
    if got < entry.size:
        raise http.client.IncompleteRead(b"", entry.size - got)


def _verify_and_rename(entry: ManifestEntry, part: Path, final: Path) -> None:
    size = part.stat().st_size
    if size != entry.size:
        part.unlink()
        raise ChecksumError(f"{entry.filename}: received {size} bytes, the manifest says {entry.size}; "
                            f"deleted {part.name}")
    got = _md5_of(part).hexdigest()
    if got != entry.md5:
        part.unlink()
        raise ChecksumError(f"{entry.filename}: md5 {got} does not match the manifest's {entry.md5}; "
                            f"deleted {part.name}, the next run downloads it again")
    os.replace(part, final)
    log.info("%s: %d bytes, md5 verified", entry.filename, size)


def download_manifest(manifest: str | Path, out_dir: str | Path, base_url: str = GDC_DATA_URL,
                      only: Iterable[str] | None = None, **kwargs) -> list[Path]:
    """Download (or resume) the selected files of a manifest one after the other; returns the final paths."""
    entries = select(read_manifest(manifest), only)
    return [download_file(e, out_dir, base_url=base_url, **kwargs) for e in entries]
