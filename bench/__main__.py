"""The bench harness: ours vs DCMTK storescp and Orthanc, side by side (issue 9).

    .venv/bin/python -m bench all [--runs 3] [--quick]
    .venv/bin/python -m bench ingest concurrent small flat query render move memory
    .venv/bin/python -m bench 1 5 7 --runs 5
    .venv/bin/python -m bench list

Installs what it compares against when missing (DCMTK, Orthanc and its DICOMweb
plugin, with apt-get), starts every peer on 127.0.0.1 with a generated config
in a temp dir, interleaves configurations run by run, and prints one markdown
table per scenario (median/min/max over runs, ratios ours/peer from the same
runs) and the issue-9 targets met or not. PostgreSQL and SeaweedFS are set up
by `bash scripts/test.sh`. Data sets and bulk-loaded archives are cached in
$PACS_BENCH_CACHE (default /tmp/filmless-bench). --quick: small sizes, 1 run.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import datetime

from .common import CACHE
from .harness import Ctx, Report, log, markdown
from .peers import NODELAY_NOTE, ensure_installed, leftovers, stop_all, versions
from .scenarios import SCENARIOS


def _resolve(names: list[str]) -> list[str]:
    by_number = {str(number): name for name, (number, _, _) in SCENARIOS.items()}
    chosen: list[str] = []
    for name in names:
        if name == "all":
            chosen += list(SCENARIOS)
            continue
        name = by_number.get(name, name)
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from: all, {', '.join(SCENARIOS)} (or 1-8)")
        chosen.append(name)
    return list(dict.fromkeys(chosen))


def _check_backends() -> None:
    """PostgreSQL on 127.0.0.1:5432 (started if installed but down) and SeaweedFS."""
    import psycopg

    from tests.peers import PG_ADMIN, S3Server  # noqa: F401

    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return
    except psycopg.OperationalError:
        pass
    log("PostgreSQL is not answering on 127.0.0.1:5432; trying to start the local cluster")
    subprocess.run("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main start",
                   shell=True, check=False)
    for _ in range(60):
        try:
            psycopg.connect(PG_ADMIN, connect_timeout=3).close()
            return
        except psycopg.OperationalError:
            time.sleep(0.5)
    raise SystemExit("PostgreSQL is needed for the pg-s3 configurations: run `bash scripts/test.sh` once")


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import os

    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs ({model}), load average {load[0]:.2f} at start; Python "
            f"{platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="+", help="all, list, or scenario names/numbers")
    parser.add_argument("--runs", type=int, default=None, help="runs per configuration (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test), 1 run unless --runs")
    parser.add_argument("--repeat", type=int, default=None, help="queries/requests per latency figure per run")
    args = parser.parse_args(argv)
    if args.scenarios == ["list"]:
        for name, (number, title, _) in SCENARIOS.items():
            print(f"{number}. {name}: {title}")
        return 0
    chosen = _resolve(args.scenarios)
    runs = args.runs or (1 if args.quick else 3)
    installed = ensure_installed(["dcmtk", "orthanc", "orthanc-dicomweb"])
    _check_backends()
    ctx = Ctx.create(runs, args.quick)
    if args.repeat:
        ctx.repeat = args.repeat
    print(f"# filmless-pacs bench ({'quick' if args.quick else 'full'}), {datetime.now():%Y-%m-%d %H:%M}")
    print()
    print(f"- machine: {_machine()}")
    print(f"- peers: " + ", ".join(f"{k} {v}" for k, v in versions().items())
          + (f" (installed now: {', '.join(installed)})" if installed else ""))
    print(f"- {NODELAY_NOTE}.")
    print(f"- runs per configuration: {runs}, interleaved run by run; cache: {CACHE}; work dir: {ctx.work}")
    sys.stdout.flush()
    reports: list[Report] = []
    failed: list[str] = []
    try:
        for name in chosen:
            number, title, scenario = SCENARIOS[name]
            report = Report(str(number), title)
            log(f"== scenario {number} ({name}) ==")
            start = time.perf_counter()
            try:
                scenario(ctx, report)
            except Exception as exc:  # one broken scenario must not hide the others' figures
                import traceback

                traceback.print_exc()
                failed.append(f"{number} ({name}): {exc!r}")
                report.note(f"FAILED: {exc!r}")
            report.seconds = time.perf_counter() - start
            reports.append(report)
            print(report.render(), flush=True)
            stop_all()
    finally:
        left_registered = stop_all()
        ctx.close()
    targets = [t for r in reports for t in r.targets]
    if targets:
        print("\n## Targets of issue 9\n")
        print(markdown(["scenario", "target", "value", "met"],
                       [[t.scenario, t.text, f"{t.value:.2f}" + (f" ({t.detail})" if t.detail else ""),
                         "yes" if t.met else "**no**"] for t in targets]))
    print("\n## Time per scenario\n")
    print(markdown(["scenario", "seconds"], [[f"{r.scenario}. {r.title}", f"{r.seconds:.0f}"] for r in reports]))
    leaks = leftovers()
    print(f"\npeers left running: {len(leaks)}" + (f" ({left_registered} stopped at the end)" if left_registered else ""))
    for leak in leaks:
        print(f"  LEFT RUNNING: {leak}")
    if failed:
        print("\nFAILED scenarios: " + "; ".join(failed))
    return 1 if failed or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
