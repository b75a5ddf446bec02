"""Crash safety, long run: SIGKILL `pacs serve` at many random moments while
several DCMTK storescu processes send, and count acknowledged instances lost
(must be 0). The CI version is tests/test_crash.py.

    .venv/bin/python -m bench.crash --rounds 50 --studies 4 --slices 100 --backends sqlite-fs,pg-s3
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.crash_harness import Tally, crash_round, final_round, make_corpus
from tests.peers import PacsServer

from .common import backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--studies", type=int, default=4, help="concurrent storescu processes, one study each")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="CT matrix (256 -> 128 KiB per image)")
    parser.add_argument("--max-delay", type=float, default=4.0, help="latest kill, seconds after start")
    parser.add_argument("--backends", default="sqlite-fs,pg-s3")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    failed = False
    try:
        corpus = make_corpus(work / "modalities", args.studies, args.slices, args.size)
        for name in args.backends.split(","):
            with backend(name, work / name) as chosen:
                server = PacsServer(work / name / "data", chosen)
                (work / name).mkdir(parents=True, exist_ok=True)
                tally, rng, problems = Tally(), random.Random(args.seed), []
                start = time.perf_counter()
                try:
                    for i in range(args.rounds):
                        problems += crash_round(server, corpus, tally, rng, args.max_delay)
                        print(f"{name} round {i + 1}: {len(tally.acknowledged)} acknowledged so far, "
                              f"{len(problems)} problems", file=sys.stderr)
                        if problems:
                            break
                    if not problems:
                        problems += final_round(server, corpus, tally)
                finally:
                    server.stop()
                print(f"[{name}] {tally.summary(len(corpus.files))}; {time.perf_counter() - start:.0f} s")
                for problem in problems:
                    print(f"  PROBLEM: {problem}")
                failed |= bool(problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
