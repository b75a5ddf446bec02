"""bench/render: rendered-frame latency (cold and cached) and QIDO-RS latency.

1. Rendered frames over HTTP from `pacs serve` (SQLite + filesystem) for a
   512x512 CT slice, a 2048x2048 16-bit DX and a JPEG 2000 compressed
   512x512 slice: cold (a window never asked before, so nothing is cached)
   and cached (the same request again), plus cached thumbnails.
2. QIDO-RS search latency on an archive bulk-loaded with --studies studies
   (default 100,000): the reader queries of bench/query, over HTTP.

Prints p50/p95 in milliseconds.
Run: .venv/bin/python -m bench.render [--studies 100000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .common import ROOT  # noqa: F401  (puts the repo on sys.path)
from .query import identifiers, percentile
from .synthetic import LoadSpec, load

from pydicom import dcmread  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from pacs.index import create_index_engine, upgrade_schema  # noqa: E402
from tests.peers import Backend, PacsServer  # noqa: E402


def _timed(client: httpx.Client, url: str, params: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    response = client.get(url, params=params)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def _row(label: str, times: list[float]) -> list[str]:
    return [label, f"{statistics.median(times):.1f}", f"{percentile(times, 0.95):.1f}", str(len(times))]


def render_bench(work: Path, repeat: int) -> list[list[str]]:
    from sample_studies.generate import generate_all

    samples = work / "samples"
    generate_all(samples, ct_slices=40)
    manifest = json.loads((samples / "manifest.json").read_text())
    by_name = {s["name"]: s for s in manifest["studies"]}
    # A 512x512 JPEG 2000 slice made from the CT, to compare codecs at one size.
    j2k_dir = work / "j2k"
    j2k_dir.mkdir()
    ct_file = samples / by_name["ct"]["series"][0]["files"][0]
    ds = dcmread(ct_file)
    ds.compress(JPEG2000Lossless)  # a new SOP Instance UID: a separate object
    ds.save_as(j2k_dir / "ct_j2k.dcm", enforce_file_format=True)

    server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(samples), str(j2k_dir))
    server.start()
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60, headers=server.auth_headers) as http:

            def instance_url(study: str, series: str, sop: str) -> str:
                return f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"

            ct = by_name["ct"]
            ct_urls = [
                instance_url(ct["study_instance_uid"], ct["series"][0]["series_instance_uid"],
                             str(dcmread(samples / f, stop_before_pixels=True).SOPInstanceUID))
                for f in ct["series"][0]["files"]
            ]
            dx = by_name["dx"]
            dx_url = instance_url(dx["study_instance_uid"], dx["series"][0]["series_instance_uid"],
                                  str(dcmread(samples / dx["series"][0]["files"][0], stop_before_pixels=True).SOPInstanceUID))
            j2k = dcmread(j2k_dir / "ct_j2k.dcm", stop_before_pixels=True)
            j2k_url = instance_url(str(j2k.StudyInstanceUID), str(j2k.SeriesInstanceUID), str(j2k.SOPInstanceUID))
            for label, urls in (("CT 512x512", ct_urls), ("DX 2048x2048", [dx_url]), ("JPEG 2000 512x512", [j2k_url])):
                for media in ("image/jpeg", "image/png"):
                    cold, cached = [], []
                    for i in range(repeat):
                        url = urls[i % len(urls)] + "/rendered"
                        params = {"window": f"{40 + i},{400 + 7 * i},linear", "accept": media}
                        cold.append(_timed(http, url, params))
                        cached.append(_timed(http, url, params))
                    rows.append(_row(f"{label} rendered {media.split('/')[1]}, cold", cold))
                    rows.append(_row(f"{label} rendered {media.split('/')[1]}, cached", cached))
            thumb = f"/dicom-web/studies/{ct['study_instance_uid']}/thumbnail"
            _timed(http, thumb)
            rows.append(_row("study thumbnail, cached", [_timed(http, thumb) for _ in range(repeat)]))
    finally:
        server.stop()
    return rows


def qido_bench(work: Path, studies: int, repeat: int) -> list[list[str]]:
    data = work / "qido"
    data.mkdir()
    engine = create_index_engine(f"sqlite:///{data}/index.sqlite")
    upgrade_schema(engine)
    load(engine, LoadSpec(studies=studies, instances_per_study=10))
    plans = identifiers(engine, random.Random(5), repeat)
    engine.dispose()
    server = PacsServer(data, Backend("sqlite-fs", None, None, {})).start()
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60, headers=server.auth_headers) as http:
            for label, queries in plans.items():
                for q in queries[:3]:
                    _timed(http, "/dicom-web/studies", q)
                times = [_timed(http, "/dicom-web/studies", {**q, "limit": "100"}) for q in queries]
                rows.append(_row(f"QIDO-RS {label}", times))
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--skip-qido", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-render-"))
    try:
        rows = render_bench(work, args.repeat)
        if not args.skip_qido:
            print("loading the QIDO archive...", file=sys.stderr)
            rows += qido_bench(work, args.studies, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## rendered frames and QIDO-RS (SQLite + filesystem; QIDO at {args.studies:,} studies)")
    print("| request | p50 ms | p95 ms | n |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")



if __name__ == "__main__":
    main()
