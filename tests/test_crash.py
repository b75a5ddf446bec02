"""Crash safety (issue 8): SIGKILL `pacs serve` while modalities send; every
acknowledged instance survives, byte-identical, and resends complete the
studies. The long version is bench/crash.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.crash_harness import Tally, crash_round, final_round, make_corpus
from tests.peers import PacsServer


@pytest.mark.timeout(900)
def test_sigkill_during_stores_loses_nothing_acknowledged(tmp_path: Path, backend, capsys) -> None:
    corpus = make_corpus(tmp_path / "modalities", studies=3, slices=40)
    server = PacsServer(tmp_path / "data", backend)
    rng = random.Random(8)
    tally = Tally()
    problems: list[str] = []
    try:
        for _ in range(6):
            problems += crash_round(server, corpus, tally, rng, max_delay=2.5)
            assert not problems, problems
        problems += final_round(server, corpus, tally)
    finally:
        server.stop()
    with capsys.disabled():
        print(f"\n[{backend.name}] " + tally.summary(len(corpus.files)))
    assert not problems, problems
    assert tally.kills_mid_send > 0
    assert len(tally.acknowledged) == len(corpus.files)
