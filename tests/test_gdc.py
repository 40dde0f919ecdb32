"""GDC downloads against a loopback HTTP server with Range support (no external traffic); the labels CSV."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zoomldm.cli.main import main
from zoomldm.data import gdc

ROOT = Path(__file__).resolve().parents[1]
SIZE = 3 * gdc.CHUNK + 12345          # several read chunks, not a multiple of one
CUT = gdc.CHUNK + gdc.CHUNK // 2      # the first transfer is cut off mid-chunk


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /data/<id>: 200, or 206 for `Range: bytes=N-`; the first transfer of an id in `cut` stops early."""

    def do_GET(self):
        srv = self.server
        fid = urllib.parse.urlparse(self.path).path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        srv.requests.append((fid, rng))
        data = srv.files.get(fid)
        if srv.busy.get(fid, 0) > 0:      # answer 503 this many times
            srv.busy[fid] -= 1
            self.send_error(503, "Service Unavailable")
            return
        if data is None:
            self.send_error(404, "File Not Found")
            return
        start = 0
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut.pop(fid, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:               # close the connection with Content-Length bytes still owed
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Tests may only talk to 127.0.0.1 (never the real GDC API)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    real = urllib.request.urlopen

    def guarded(req, *a, **kw):
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        assert urllib.parse.urlparse(url).hostname == "127.0.0.1", f"test tried to reach {url}"
        return real(req, *a, **kw)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.cut, srv.busy, srv.requests, srv.ranges = {}, {}, {}, [], True
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/data"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _payload(seed=0, size=SIZE) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _manifest(path: Path, rows, header="id\tfilename\tmd5\tsize\tstate") -> Path:
    lines = [header] + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _entry(server, fid, name, data, md5=None) -> gdc.ManifestEntry:
    server.files[fid] = data
    return gdc.ManifestEntry(fid, name, md5 or hashlib.md5(data).hexdigest(), len(data), "released")


def test_manifest_is_parsed(tmp_path):
    m = _manifest(tmp_path / "m.tsv", [("u1", "TCGA-A1-A0SB-01Z-00-DX1.ABC.svs", "0" * 31 + "A", 10, "ok"),
                                       ("u2", "b.svs", "f" * 32, 20, "ok")])
    entries = gdc.read_manifest(m)
    assert [(e.id, e.filename, e.size) for e in entries] == [("u1", "TCGA-A1-A0SB-01Z-00-DX1.ABC.svs", 10),
                                                             ("u2", "b.svs", 20)]
    assert entries[0].md5 == "0" * 31 + "a"                    # normalised to lower case
    assert [e.id for e in gdc.select(entries, ["b.svs"])] == ["u2"]
    with pytest.raises(gdc.ManifestError, match="not in the manifest: zz"):
        gdc.select(entries, ["u1", "zz"])


def test_manifest_missing_column_is_one_line(tmp_path):
    m = _manifest(tmp_path / "m.tsv", [("u1", "a.svs", 10, "released")], header="id\tfilename\tsize\tstate")
    with pytest.raises(gdc.ManifestError) as e:
        gdc.read_manifest(m)
    msg = str(e.value)
    assert "\n" not in msg and "m.tsv" in msg and "lacks column(s) md5" in msg


def test_manifest_bad_size_names_the_file(tmp_path):
    m = _manifest(tmp_path / "m.tsv", [("u1", "a.svs", "f" * 32, "12kB", "released")])
    with pytest.raises(gdc.ManifestError, match=r"m.tsv:2: a.svs: size '12kB' is not an integer"):
        gdc.read_manifest(m)


def test_interrupted_transfer_resumes_on_rerun(server, tmp_path):
    data = _payload()
    entry = _entry(server, "uuid-1", "slide1.svs", data)
    server.cut["uuid-1"] = CUT
    with pytest.raises(gdc.DownloadError, match="slide1.svs: download failed") as e:
        gdc.download_file(entry, tmp_path, base_url=server.base_url, retries=0, progress=False)
    assert "\n" not in str(e.value)
    part = tmp_path / "slide1.svs.part"
    assert part.stat().st_size == CUT and not (tmp_path / "slide1.svs").exists()

    out = gdc.download_file(entry, tmp_path, base_url=server.base_url, retries=0, progress=False)
    assert out == tmp_path / "slide1.svs" and out.read_bytes() == data and not part.exists()
    assert server.requests == [("uuid-1", None), ("uuid-1", f"bytes={CUT}-")]   # only the rest was fetched

    gdc.download_file(entry, tmp_path, base_url=server.base_url, progress=False)
    assert len(server.requests) == 2                            # a finished file is not fetched again


def test_retry_resumes_within_one_call(server, tmp_path):
    data = _payload(1)
    entry = _entry(server, "uuid-2", "slide2.svs", data)
    server.cut["uuid-2"] = CUT
    out = gdc.download_file(entry, tmp_path, base_url=server.base_url, retries=2, backoff=0, progress=True)
    assert hashlib.md5(out.read_bytes()).hexdigest() == entry.md5
    assert server.requests == [("uuid-2", None), ("uuid-2", f"bytes={CUT}-")]


def test_server_errors_are_retried_a_bounded_number_of_times(server, tmp_path):
    data = _payload(7, 1000)
    entry = _entry(server, "uuid-6", "slide6.svs", data)
    server.busy["uuid-6"] = 2
    assert gdc.download_file(entry, tmp_path, base_url=server.base_url, retries=2, backoff=0,
                             progress=False).read_bytes() == data
    assert len(server.requests) == 3
    (tmp_path / "slide6.svs").unlink()
    server.busy["uuid-6"] = 100
    with pytest.raises(gdc.DownloadError, match=r"^slide6.svs: download failed after 3 retries .*HTTP 503"):
        gdc.download_file(entry, tmp_path, base_url=server.base_url, retries=3, backoff=0, progress=False)
    assert len(server.requests) == 3 + 4                          # the first try and 3 retries


def test_wrong_md5_is_rejected_naming_the_file(server, tmp_path):
    entry = _entry(server, "uuid-3", "slide3.svs", _payload(2), md5="0" * 32)
    with pytest.raises(gdc.ChecksumError) as e:
        gdc.download_file(entry, tmp_path, base_url=server.base_url, progress=False)
    msg = str(e.value)
    assert msg.startswith("slide3.svs: md5 ") and "0" * 32 in msg and "\n" not in msg
    # Documented choice: the .part is deleted (a corrupt prefix would never verify), nothing is renamed.
    assert sorted(os.listdir(tmp_path)) == []


def test_server_without_range_support_starts_again(server, tmp_path):
    data = _payload(3)
    entry = _entry(server, "uuid-4", "slide4.svs", data)
    server.ranges = False
    (tmp_path / "slide4.svs.part").write_bytes(data[:1000])
    out = gdc.download_file(entry, tmp_path, base_url=server.base_url, backoff=0, progress=False)
    assert out.read_bytes() == data
    assert server.requests == [("uuid-4", "bytes=1000-"), ("uuid-4", None)]


def test_corrupt_partial_prefix_fails_md5_then_recovers(server, tmp_path):
    data = _payload(4)
    entry = _entry(server, "uuid-5", "slide5.svs", data)
    (tmp_path / "slide5.svs.part").write_bytes(b"\0" * 1000)      # not the file's first bytes
    with pytest.raises(gdc.ChecksumError, match="slide5.svs: md5"):
        gdc.download_file(entry, tmp_path, base_url=server.base_url, progress=False)
    assert gdc.download_file(entry, tmp_path, base_url=server.base_url, progress=False).read_bytes() == data


def test_http_error_is_one_line(server, tmp_path):
    entry = gdc.ManifestEntry("missing-id", "gone.svs", "f" * 32, 10)
    with pytest.raises(gdc.DownloadError, match=r"^gone.svs: HTTP 404 .*missing-id$"):
        gdc.download_file(entry, tmp_path, base_url=server.base_url, progress=False)


def test_cli_downloads_selected_files_and_reports_errors(server, tmp_path):
    good, bad = _payload(5, 5000), _payload(6, 7000)
    server.files.update({"g": good, "b": bad})
    m = _manifest(tmp_path / "manifest.txt", [("g", "good.svs", hashlib.md5(good).hexdigest(), 5000, "ok"),
                                              ("b", "bad.svs", "1" * 32, 7000, "ok")])
    out = tmp_path / "slides"
    res = CliRunner().invoke(main, ["fetch", "gdc", "--manifest", str(m), "--out", str(out),
                                    "--base-url", server.base_url, "--only", "g", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out / "good.svs") and (out / "good.svs").read_bytes() == good
    res = CliRunner().invoke(main, ["fetch", "gdc", "--manifest", str(m), "--out", str(out),
                                    "--base-url", server.base_url, "--no-progress"])
    assert res.exit_code == 2
    err = res.output.strip().splitlines()[-1]
    assert err.startswith("zoomldm: error: bad.svs: md5 ") and "1" * 32 in err


# ---------------------------------------------------------------------------------------------------------
# Labels for the MIL tasks.

GDC_CLINICAL = (
    "cases.case_id\tcases.submitter_id\tdiagnoses.primary_diagnosis\thrd\n"
    "c1\tTCGA-A1-A0SB\tInfiltrating duct carcinoma, NOS\t50\n"
    "c1\tTCGA-A1-A0SB\tInfiltrating duct carcinoma, NOS\t50\n"   # GDC repeats a case per treatment row
    "c2\tTCGA-A2-A04P\tLobular carcinoma, NOS\t12\n"
    "c3\tTCGA-A2-A0CM\tMucinous adenocarcinoma\t'--\n"
    "c4\tTCGA-AR-A1AR\t'--\t44\n"
)
CBIO_CLINICAL = (
    "#Patient Identifier\tOncotree Code\n#x\tx\n#STRING\tSTRING\n#1\t1\n"
    "SAMPLE_ID\tONCOTREE_CODE\nTCGA-A1-A0SB-01\tIDC\nTCGA-A2-A04P-01\tILC\n"
)


def test_labels_from_gdc_clinical_table_by_mapping_and_threshold(tmp_path):
    clinical = tmp_path / "clinical.tsv"
    clinical.write_text(GDC_CLINICAL)
    slides = tmp_path / "slides"
    slides.mkdir()
    for case in ["A1-A0SB", "A2-A04P", "A2-A0CM", "AR-A1AR", "ZZ-0000"]:
        (slides / f"TCGA-{case}-01Z-00-DX1.B3F1.svs").touch()
    out = tmp_path / "labels.csv"
    res = CliRunner().invoke(main, ["fetch", "labels", "--clinical", str(clinical), "--out", str(out),
                                    "--column", "diagnoses.primary_diagnosis", "--slides", f"{slides}/*.svs",
                                    "--map", "Infiltrating duct carcinoma, NOS=IDC",
                                    "--map", "Lobular carcinoma, NOS=ILC"])
    assert res.exit_code == 0, res.output
    assert out.read_text().splitlines() == ["slide,label", "TCGA-A1-A0SB-01Z-00-DX1,IDC",
                                            "TCGA-A2-A04P-01Z-00-DX1,ILC"]
    res = CliRunner().invoke(main, ["fetch", "labels", "--clinical", str(clinical), "--out", str(out),
                                    "--column", "hrd", "--threshold", "42", "--slides", f"{slides}/*.svs"])
    assert res.exit_code == 0, res.output
    assert out.read_text().splitlines() == ["slide,label", "TCGA-A1-A0SB-01Z-00-DX1,1",
                                            "TCGA-A2-A04P-01Z-00-DX1,0", "TCGA-AR-A1AR-01Z-00-DX1,1"]


def test_labels_from_cbioportal_sample_table_and_manifest(tmp_path):
    clinical = tmp_path / "data_clinical_sample.txt"
    clinical.write_text(CBIO_CLINICAL)
    m = _manifest(tmp_path / "m.tsv", [("u1", "TCGA-A2-A04P-01Z-00-DX1.C9.svs", "f" * 32, 1, "released"),
                                       ("u2", "TCGA-A1-A0SB-01Z-00-DX1.B3.svs", "f" * 32, 1, "released")])
    out = tmp_path / "labels.csv"
    res = CliRunner().invoke(main, ["fetch", "labels", "--clinical", str(clinical), "--out", str(out),
                                    "--column", "ONCOTREE_CODE", "--manifest", str(m)])
    assert res.exit_code == 0, res.output
    assert out.read_text().splitlines() == ["slide,label", "TCGA-A2-A04P-01Z-00-DX1,ILC",
                                            "TCGA-A1-A0SB-01Z-00-DX1,IDC"]


def test_labels_errors_are_one_line(tmp_path):
    clinical = tmp_path / "clinical.tsv"
    clinical.write_text(GDC_CLINICAL + "c1\tTCGA-A1-A0SB\tLobular carcinoma, NOS\t50\n")
    out = tmp_path / "labels.csv"
    res = CliRunner().invoke(main, ["fetch", "labels", "--clinical", str(clinical), "--out", str(out),
                                    "--column", "diagnosis"])
    assert res.exit_code == 2 and "no column 'diagnosis'" in res.output and len(res.output.splitlines()) == 1
    res = CliRunner().invoke(main, ["fetch", "labels", "--clinical", str(clinical), "--out", str(out),
                                    "--column", "diagnoses.primary_diagnosis"])
    assert res.exit_code == 2 and "TCGA-A1-A0SB has two labels" in res.output


# ---------------------------------------------------------------------------------------------------------
# The workflow rule (workflow/rules/fetch.smk), included from a tiny Snakefile that supplies what
# common.smk defines for it (CFG, ZOOMLDM, ENV).

SNAKEFILE = """
import os, sys
sys.path.insert(0, {root!r})
from snakemake.exceptions import WorkflowError
from zoomldm.config import config_from_dict
CFG = config_from_dict({{"dataset": {{"name": "brca", "inputs": "resources/brca/slides/*.svs"}}}})
ZOOMLDM = "PYTHONPATH={root} python -m zoomldm"
ENV = {env!r}

include: {fetch!r}
"""


@pytest.mark.slow
def test_fetch_rule_downloads_the_manifest(server, tmp_path):
    files = {f"id{i}": (f"TCGA-X{i}.svs", _payload(10 + i, 4000 + i)) for i in range(2)}
    for fid, (_, data) in files.items():
        server.files[fid] = data
    (tmp_path / "resources/brca").mkdir(parents=True)
    _manifest(tmp_path / "resources/brca/gdc_manifest.tsv",
              [(fid, name, hashlib.md5(d).hexdigest(), len(d), "ok") for fid, (name, d) in files.items()])
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(root=str(ROOT), env=str(ROOT / "environment.yml"),
                                                         fetch=str(ROOT / "workflow/rules/fetch.smk")))
    env = dict(os.environ, ZOOMLDM_GDC_URL=server.base_url, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "gdc_slides"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for _, (name, data) in files.items():
        assert (tmp_path / "resources/brca/slides" / name).read_bytes() == data
    assert sorted(r[0] for r in server.requests) == sorted(files)
