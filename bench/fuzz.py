"""Bad input, fuzzed -- the long run (issue 8). The CI version is
tests/test_fuzz.py; both use the generators and drivers of tests/fuzzing.py.

    .venv/bin/python -m bench.fuzz --minutes 30
    .venv/bin/python -m bench.fuzz --examples 2000 --targets pdu,cstore,hl7
    .venv/bin/python -m bench.fuzz --minutes 10 --backend pg-s3 --http-examples 200

With --minutes, the time is split evenly between the chosen targets and each
one repeats batches of Hypothesis examples until its share is used up (the
HTTP share is split again between the API operations). Without it, each
target gets --examples inputs (--http-examples per API operation).

Targets: ingest (mutated Part 10 into the core's ingest, in-process on SQLite
and files), pdu (raw malformed PDUs / A-ASSOCIATE-RQs), cstore (malformed
datasets over valid associations), hl7 (broken MLLP and HL7 v2), web
(DICOMweb/WADO-URI parameters, headers, STOW bodies) and http (schemathesis
over /openapi.json). After each network target the server must still be
alive, with no traceback in its log, and still take a good DCMTK echo and
store, a good HL7 order and GET /health; a failure there counts as a crash.

Prints one table: inputs tried per target, answers by kind, crashes (must be
0). Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzzing import (
    Budget,
    Tally,
    assert_all_serving,
    log_mark,
    core_on,
    fuzz_cstore,
    fuzz_hl7,
    fuzz_http,
    fuzz_ingest,
    fuzz_pdus,
    fuzz_web,
    http_operations,
    load_openapi,
    stored_path_values,
)
from tests.peers import PacsServer

from .common import backend

TARGETS = ("ingest", "pdu", "cstore", "hl7", "web", "http")


@dataclass
class Row:
    target: str
    tally: Tally
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_target(name: str, args: argparse.Namespace, share: float | None, server: PacsServer | None,
               work: Path, path_values: dict[str, str]) -> Row:
    """One target, its crashes caught and counted so the others still run."""
    row = Row(name, Tally("dicomweb" if name == "web" else name))
    mark = log_mark(server) if server is not None else 0
    start = time.perf_counter()
    try:
        if name == "ingest":
            # The core logs a warning per odd object; the table is the output here.
            logging.getLogger("pacs").setLevel(logging.ERROR)
            with core_on(work / "ingest-core") as pacs:
                fuzz_ingest(pacs, Budget(args.examples, share), row.tally)
        elif name == "http":
            assert server is not None
            seconds = None
            if share is not None:
                operations = len(http_operations(load_openapi(server, server.token)))
                seconds = share / max(1, operations)
            fuzz_http(server, Budget(args.http_examples, seconds), path_values, tally=row.tally)
        else:
            assert server is not None
            driver = {"pdu": fuzz_pdus, "cstore": fuzz_cstore, "hl7": fuzz_hl7}.get(name)
            if driver is not None:
                driver(server, Budget(args.examples, share), row.tally)
            else:
                fuzz_web(server, Budget(args.examples, share), path_values, tally=row.tally)
    except BaseException as exc:  # a crash: count it, print it, go on with the next target
        if isinstance(exc, KeyboardInterrupt):
            raise
        row.tally.crashes = max(row.tally.crashes, 1)
        row.problems.append("".join(traceback.format_exception(exc))[-6000:])
    if server is not None and name != "ingest":
        try:
            assert_all_serving(server, work, since=mark)
        except AssertionError as exc:
            row.tally.crashes += 1
            row.problems.append(f"server not healthy after {name}: {exc}"[:6000])
    row.seconds = time.perf_counter() - start
    return row


def print_table(rows: list[Row], backend_name: str) -> None:
    print(f"\n## Fuzz: bad input ({backend_name})")
    print("| target | inputs | crashes | seconds | inputs/s | answers by kind |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        rate = row.tally.inputs / row.seconds if row.seconds else 0.0
        print(f"| {row.target} | {row.tally.inputs} | {row.tally.crashes} | {row.seconds:.0f} | {rate:.1f} | "
              f"{row.tally.detail(10) or '-'} |")
    total = sum(r.tally.inputs for r in rows)
    crashes = sum(r.tally.crashes for r in rows)
    print(f"| **total** | {total} | {crashes} | {sum(r.seconds for r in rows):.0f} | | |")
    for row in rows:
        for problem in row.problems:
            print(f"\n### PROBLEM in {row.target}\n```\n{problem}\n```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None, help="total time, split evenly between targets")
    parser.add_argument("--examples", type=int, default=1000, help="inputs per target (batch size with --minutes)")
    parser.add_argument("--http-examples", type=int, default=50, help="inputs per API operation for http")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}")
    parser.add_argument("--backend", default="sqlite-fs", choices=["sqlite-fs", "pg-s3"],
                        help="index + store of the `pacs serve` under test (ingest always runs on SQLite + files)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (server log, data) for a post-mortem")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    share = args.minutes * 60 / len(targets) if args.minutes else None

    work = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    rows: list[Row] = []
    try:
        server = None
        network = [t for t in targets if t != "ingest"]
        if "ingest" in targets:
            log("fuzz: ingest ...")
            rows.append(run_target("ingest", args, share, None, work, {}))
            log(rows[-1].tally.line())
        if network:
            with backend(args.backend, work / args.backend) as chosen:
                (work / "data").mkdir()
                server = PacsServer(work / "data", chosen).start()
                try:
                    path_values = stored_path_values(server, work)
                    for name in network:
                        log(f"fuzz: {name} ...")
                        rows.append(run_target(name, args, share, server, work, path_values))
                        log(rows[-1].tally.line())
                finally:
                    server.stop()
    finally:
        print_table(rows, args.backend)
        if args.keep:
            print(f"\nwork dir kept: {work} (server log: {work}/data-serve.log)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if any(r.tally.crashes for r in rows) else 0)


if __name__ == "__main__":
    main()
