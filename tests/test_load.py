"""Load (issue 8), short CI version of bench/load.py: 8 concurrent storescu
associations with C-FIND and QIDO-RS queries alongside; no failure status, no
logged error, every acknowledged instance indexed. Figures are printed, never
asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import run_load, template_studies
from tests.peers import Backend, PacsServer


@pytest.mark.timeout(600)
def test_concurrent_stores_and_queries_without_errors(tmp_path: Path, capsys) -> None:
    templates = template_studies(8, slices=10, size=256)
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        report = run_load(server, templates, 12, tmp_path / "senders")
        assert server.alive()
    finally:
        server.stop()
    with capsys.disabled():
        print("\n" + "\n".join(report.lines(len(templates))))
    assert not report.failures, report.failures
    assert report.stored > 0 and report.find_ms and report.qido_ms
    assert server.stats()["instances"] == report.stored
