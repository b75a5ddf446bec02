"""bench/convert_memory: peak memory of `pacs serve` while several clients at
once convert a big JPEG-LS multi-frame object, under glibc malloc settings.

Issue 9 scenario 8 wants the server under 300 MB whatever the study. A
tomosynthesis-like object (--frames frames of --side x --side 12-bit in
16-bit words, JPEG-LS lossless: 18 MB per frame decoded at 3000x3000) is
retrieved by 1, 4, 8 concurrent HTTP clients:

- frames:   WADO-RS .../frames/1,2,.. as application/octet-stream (decoded);
- explicit: the whole instance in the default Explicit VR Little Endian;
- j2k:      the whole instance with transfer-syntax=JPEG 2000 lossless.

Each setting of --settings runs against a server of its own (one per mode,
the client counts in order, as a long-running server would see them),
runs alternated setting by setting: ``default`` is the code as it is; a
setting like ``mmap=4M`` or ``mmap=4M+trim=32M`` starts the server with
glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (as mallopt
M_MMAP_THRESHOLD / M_TRIM_THRESHOLD at process start, which also turns off
glibc's dynamic threshold; inherited by DICOM worker processes). Only the
server gets them, not this client.

Printed per step: the serve process's peak RSS (VmHWM, reset just before the
step), the peak RSS of its process tree (sampled every 20 ms), the RSS left
after the step, the frames converted per second, and the server's CPU time
(user + system) and minor page faults per frame: on a shared machine the wall
time follows the other work, the server's CPU far less. Then the ordinary
path under the same settings (--slices 512x512 CT instances): the whole study
over WADO-RS (as stored and Explicit VR LE: MB/s, server CPU per GB, peak) and
the p50 latency and server CPU of CT frames (.../frames/1) and cold rendered
frames, so that a setting that lowers the peak does not make 512 KB frames
slower.

Run: .venv/bin/python -m bench.convert_memory [--settings default,mmap=4M]
     [--runs 3] [--clients 1,4,8] [--side 3000] [--frames 4] [--slices 600]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .common import CACHE  # (also puts the repo on sys.path)
from .peers import RssSampler, tree_rss_kb

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, generate_uid  # noqa: E402

from tests.peers import Backend, PacsServer  # noqa: E402

MB = 1 << 20
# glibc's environment forms of mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD.
KNOBS = {"mmap": "MALLOC_MMAP_THRESHOLD_", "trim": "MALLOC_TRIM_THRESHOLD_"}
INSTANCE = 'multipart/related; type="application/dicom"'
MODES = {
    "frames": 'multipart/related; type="application/octet-stream"',
    "explicit": INSTANCE,
    "j2k": f"{INSTANCE}; transfer-syntax={JPEG2000Lossless}",
}


def size_bytes(text: str) -> int:
    """'4M', '512K' or a number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1:].upper()])
    return int(text)


def setting_env(name: str) -> dict[str, str]:
    """The server's environment for a setting: 'default', or knob=size joined by '+'."""
    if name == "default":
        return {}
    env = {}
    for part in name.split("+"):
        knob, _, value = part.partition("=")
        if knob not in KNOBS or not value:
            raise SystemExit(f"unknown setting {part!r}: use default, mmap=SIZE, trim=SIZE joined by '+'")
        env[KNOBS[knob]] = str(size_bytes(value))
    return env


def _pixels(frames: int, side: int, seed: int) -> np.ndarray:
    """12-bit samples, a gradient with noise (JPEG-LS does not make it tiny),
    as tests/test_multiframe_review.py makes them."""
    rng = np.random.default_rng(seed)
    ramp = (np.arange(side * side, dtype=np.uint32) % 3000).astype(np.uint16).reshape(side, side)
    arr = np.empty((frames, side, side), dtype=np.uint16)
    for n in range(frames):
        arr[n] = ramp + rng.integers(0, 64, (side, side), dtype=np.uint16)
    return arr


def _jpeg_ls(path: Path, pixels: np.ndarray, study: str) -> None:
    """A Multi-frame Grayscale Word SC image of *pixels*, stored JPEG-LS lossless."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "MFBENCH", "TRAN^THI BICH"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
    frames, rows, columns = pixels.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.compress(JPEGLSLossless, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def multiframe_objects(frames: int, side: int) -> Path:
    """big.dcm (the object converted) and small.dcm (the codecs' warm-up),
    generated once and cached."""
    folder = CACHE / f"jls-{frames}x{side}"
    if not (folder / "small.dcm").exists():
        folder.mkdir(parents=True, exist_ok=True)
        study = generate_uid()
        _jpeg_ls(folder / "big.dcm", _pixels(frames, side, 2), study)
        _jpeg_ls(folder / "small.dcm", _pixels(2, 64, 3), study)
    return folder


def instance_url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _tree(pid: int) -> list[int]:
    """*pid* and its descendants (DICOM worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_and_faults(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, every thread) and minor page faults of
    *pid*'s tree so far: the server's own cost of a step, which the other
    work of a shared machine changes far less than the wall time."""
    ticks, faults = 0, 0
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        faults += int(fields[7])  # minflt (field 10 of stat)
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK"), faults


def reset_peaks(pid: int) -> None:
    """VmHWM back to VmRSS in the whole tree (/proc/PID/clear_refs, 5)."""
    for member in _tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")
        except OSError:
            pass


@dataclass
class Step:
    """One measured load: peaks and what is left, in kB; seconds; frames converted."""

    hwm_kb: int
    tree_peak_kb: int
    after_kb: int
    seconds: float
    frames: int
    received: int
    cpu: float  # the server's CPU seconds
    faults: int  # the server's minor page faults


def fetch(base: str, headers: dict[str, str], url: str, accept: str) -> int:
    """One client: GET *url* streamed and dropped; bytes received."""
    received = 0
    with httpx.Client(base_url=base, headers=headers, timeout=900) as http:
        with http.stream("GET", url, headers={"Accept": accept}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.read()[:300]!r}")
            for chunk in response.iter_bytes():
                received += len(chunk)
    return received


def load(server: PacsServer, url: str, accept: str, clients: int, frames: int, expected: int) -> Step:
    """*clients* retrieving *url* at once, while the server's memory is sampled."""
    assert server.proc is not None
    pid = server.proc.pid
    base = f"http://127.0.0.1:{server.http_port}"
    reset_peaks(pid)
    cpu, faults = cpu_and_faults(pid)
    with RssSampler(pid) as sampler, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        received = list(pool.map(lambda _: fetch(base, server.auth_headers, url, accept), range(clients)))
        seconds = time.perf_counter() - start
    cpu_after, faults_after = cpu_and_faults(pid)
    if min(received) < expected:
        raise RuntimeError(f"{url}: {min(received)} bytes received, expected at least {expected}")
    return Step(
        hwm_kb=status_kb(pid, "VmHWM"),
        tree_peak_kb=sampler.peak_kb,
        after_kb=tree_rss_kb(pid),
        seconds=seconds,
        frames=clients * frames,
        received=sum(received),
        cpu=cpu_after - cpu,
        faults=faults_after - faults,
    )


@dataclass
class Ordinary:
    """The CT path under one setting: wall and server CPU figures."""

    study_mb_s: dict[str, float] = field(default_factory=dict)
    study_cpu_s: dict[str, float] = field(default_factory=dict)  # the server's CPU seconds per GB
    study_peak_kb: int = 0
    frame_ms: float = 0.0
    frame_cpu_ms: float = 0.0  # the server's CPU per request
    rendered_ms: float = 0.0
    rendered_cpu_ms: float = 0.0


def _timed_ms(http: httpx.Client, url: str, **kwargs: object) -> float:
    start = time.perf_counter()
    response = http.get(url, **kwargs)  # type: ignore[arg-type]
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def ordinary(server: PacsServer, study: str, ct_urls: list[str], repeat: int) -> Ordinary:
    """The CT study whole (as stored, Explicit VR LE), then CT frame and cold rendered latency."""
    assert server.proc is not None
    pid = server.proc.pid
    result = Ordinary()
    with server.http() as http:  # the first request's imports, not counted per GB
        for accept in (f"{INSTANCE}; transfer-syntax=*", INSTANCE):
            _timed_ms(http, ct_urls[0], headers={"Accept": accept})
    reset_peaks(pid)
    with RssSampler(pid) as sampler:
        for label, accept in (("as stored", f"{INSTANCE}; transfer-syntax=*"), ("explicit", INSTANCE)):
            cpu = cpu_and_faults(pid)[0]
            start = time.perf_counter()
            got = fetch(f"http://127.0.0.1:{server.http_port}", server.auth_headers,
                        f"/dicom-web/studies/{study}", accept)
            result.study_mb_s[label] = got / (time.perf_counter() - start) / 1e6
            result.study_cpu_s[label] = (cpu_and_faults(pid)[0] - cpu) / (got / 1e9)
    result.study_peak_kb = sampler.peak_kb
    with server.http() as http:
        frame_accept = {"Accept": MODES["frames"]}
        for url in ct_urls[:5]:
            _timed_ms(http, url + "/frames/1", headers=frame_accept)
        cpu = cpu_and_faults(pid)[0]
        result.frame_ms = statistics.median(
            [_timed_ms(http, ct_urls[i % len(ct_urls)] + "/frames/1", headers=frame_accept) for i in range(repeat)])
        result.frame_cpu_ms = (cpu_and_faults(pid)[0] - cpu) * 1000 / repeat
        rendered = []
        cpu = cpu_and_faults(pid)[0]
        for i in range(repeat):
            params = {"window": f"{40 + i},{400 + 7 * i},linear", "accept": "image/jpeg"}
            rendered.append(_timed_ms(http, ct_urls[i % len(ct_urls)] + "/rendered", params=params))
        result.rendered_cpu_ms = (cpu_and_faults(pid)[0] - cpu) * 1000 / repeat
        result.rendered_ms = statistics.median(rendered)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="default,mmap=1M,mmap=4M,mmap=4M+trim=32M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--modes", default="frames,explicit,j2k")
    parser.add_argument("--side", type=int, default=3000)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--slices", type=int, default=600, help="CT instances of the ordinary path (0: skip it)")
    parser.add_argument("--repeat", type=int, default=100, help="requests per CT latency figure")
    args = parser.parse_args()
    settings = args.settings.split(",")
    envs = {name: setting_env(name) for name in settings}
    clients = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    for key in KNOBS.values():  # "default" is the code's own setting, not this shell's
        os.environ.pop(key, None)

    objects = multiframe_objects(args.frames, args.side)
    big = dcmread(objects / "big.dcm", stop_before_pixels=True)
    small = dcmread(objects / "small.dcm", stop_before_pixels=True)
    frame_bytes = int(big.Rows) * int(big.Columns) * 2
    work = Path(tempfile.mkdtemp(prefix="bench-convert-mem-"))
    data = work / "data"
    first = PacsServer(data, Backend("sqlite-fs", None, None, {}))
    first.cli("import", str(objects))
    ct_study, ct_urls = "", []
    if args.slices:
        from .wado_memory import big_study

        ct_folder = big_study(args.slices)
        first.cli("import", str(ct_folder))
        for path in sorted(ct_folder.glob("*.dcm")):
            ds = dcmread(path, stop_before_pixels=True)
            ct_study = str(ds.StudyInstanceUID)
            ct_urls.append(instance_url(ds))
    token = first.make_token("bench", "admin")

    # results[setting][mode][clients] = [Step per run]; idle[setting] = [kB]
    results: dict[str, dict[str, dict[int, list[Step]]]] = {s: {m: {c: [] for c in clients} for m in modes}
                                                          for s in settings}
    idle: dict[str, list[int]] = {s: [] for s in settings}
    plain: dict[str, list[Ordinary]] = {s: [] for s in settings}
    began = time.time()
    try:
        for run in range(args.runs):
            for setting in settings:
                for mode in modes:
                    server = PacsServer(data, Backend("sqlite-fs", None, None, {}), extra_env=envs[setting])
                    server.token = token
                    try:
                        server.start()
                        # The codecs' imports and first buffers, as in tests/test_multiframe_review.py.
                        with server.http() as http:
                            for target in (JPEG2000Lossless, ExplicitVRLittleEndian):
                                response = http.get(instance_url(small),
                                                    headers={"Accept": f"{INSTANCE}; transfer-syntax={target}"})
                                response.raise_for_status()
                        assert server.proc is not None
                        idle[setting].append(tree_rss_kb(server.proc.pid))
                        url = instance_url(big)
                        if mode == "frames":
                            url += "/frames/" + ",".join(str(n) for n in range(1, args.frames + 1))
                        for count in clients:
                            step = load(server, url, MODES[mode], count, args.frames,
                                        args.frames * frame_bytes // (3 if mode == "j2k" else 1))
                            results[setting][mode][count].append(step)
                            print(f"run {run + 1} {setting:>18} {mode:>8} x{count}: "
                                  f"peak {step.hwm_kb / 1024:.0f} MB (tree {step.tree_peak_kb / 1024:.0f}), "
                                  f"after {step.after_kb / 1024:.0f} MB, {step.frames / step.seconds:.2f} frames/s, "
                                  f"server CPU {step.cpu * 1000 / step.frames:.0f} ms/frame, "
                                  f"{step.faults / step.frames:.0f} minor faults/frame",
                                  flush=True)
                    finally:
                        server.stop()
                if args.slices:
                    server = PacsServer(data, Backend("sqlite-fs", None, None, {}), extra_env=envs[setting])
                    server.token = token
                    try:
                        server.start()
                        got = ordinary(server, ct_study, ct_urls, args.repeat)
                    finally:
                        server.stop()
                    plain[setting].append(got)
                    print(f"run {run + 1} {setting:>18} CT: study {got.study_mb_s['as stored']:.0f} / "
                          f"{got.study_mb_s['explicit']:.0f} MB/s (server CPU {got.study_cpu_s['as stored']:.1f} / "
                          f"{got.study_cpu_s['explicit']:.1f} s/GB), peak {got.study_peak_kb / 1024:.0f} MB, "
                          f"frame p50 {got.frame_ms:.1f} ms (CPU {got.frame_cpu_ms:.1f}), "
                          f"rendered cold p50 {got.rendered_ms:.1f} ms (CPU {got.rendered_cpu_ms:.1f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def span(values: list[float], fmt: str = "{:.0f}") -> str:
        if not values:
            return "-"
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{fmt.format(mid)} ({fmt.format(low)}-{fmt.format(high)})"

    print(f"\n## Converting a JPEG-LS object of {args.frames} x {args.side}x{args.side} 16-bit frames "
          f"({frame_bytes / MB:.1f} MB each decoded), pacs serve SQLite+fs, {args.runs} runs "
          f"({(time.time() - began) / 60:.0f} min)")
    print("median (min-max) over the runs; peak = the serve process's VmHWM reset before each step; "
          "tree = its process tree sampled every 20 ms; after = RSS once the clients are done")
    print("idle RSS after the codecs' warm-up, MB: "
          + "; ".join(f"{s} {span([k / 1024 for k in idle[s]])}" for s in settings))
    print("| mode | clients | setting | peak RSS MB | tree peak MB | RSS after MB | frames/s | "
          "server CPU ms/frame | minor faults/frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for count in clients:
            for setting in settings:
                steps = results[setting][mode][count]
                print(f"| {mode} | {count} | {setting} | {span([s.hwm_kb / 1024 for s in steps])} | "
                      f"{span([s.tree_peak_kb / 1024 for s in steps])} | {span([s.after_kb / 1024 for s in steps])} | "
                      f"{span([s.frames / s.seconds for s in steps], '{:.2f}')} | "
                      f"{span([s.cpu * 1000 / s.frames for s in steps])} | "
                      f"{span([s.faults / s.frames for s in steps])} |")
    if args.slices:
        print(f"\n## The ordinary path: {args.slices} CT instances of 512 KB, same settings")
        print("server CPU: user + system of the serve process, per GB sent or per request")
        print("| setting | study as stored MB/s | CPU s/GB | study Explicit VR LE MB/s | CPU s/GB | peak RSS MB | "
              f"CT frame p50 ms ({args.repeat}) | CPU ms | CT rendered cold p50 ms ({args.repeat}) | CPU ms |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for setting in settings:
            got = plain[setting]
            one = "{:.1f}"
            print(f"| {setting} | {span([g.study_mb_s['as stored'] for g in got])} | "
                  f"{span([g.study_cpu_s['as stored'] for g in got], one)} | "
                  f"{span([g.study_mb_s['explicit'] for g in got])} | "
                  f"{span([g.study_cpu_s['explicit'] for g in got], one)} | "
                  f"{span([g.study_peak_kb / 1024 for g in got])} | "
                  f"{span([g.frame_ms for g in got], one)} | {span([g.frame_cpu_ms for g in got], one)} | "
                  f"{span([g.rendered_ms for g in got], one)} | {span([g.rendered_cpu_ms for g in got], one)} |")
    print("target (issue 9, scenario 8): peak RSS < 300 MB")


if __name__ == "__main__":
    main()
