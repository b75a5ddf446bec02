"""Kill `pacs serve` with SIGKILL while modalities send, and account for every
acknowledged instance. Shared by tests/test_crash.py (short, in CI) and
bench/crash.py (long).

A round: start the server, let several DCMTK `storescu` processes send their
studies, SIGKILL the server at a random moment, then check the data dir
offline. The modalities resend whole studies every round, the way a real one
retries after a failed association, so studies complete over the rounds.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from tests.peers import PacsServer, dataset_bytes, dcmtk

_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


@dataclass
class Corpus:
    """The studies the modalities hold: files and their SOP Instance UIDs."""

    studies: list[list[Path]]
    sop_uid: dict[Path, str]

    @property
    def files(self) -> list[Path]:
        return [f for study in self.studies for f in study]


@dataclass
class Tally:
    """What the rounds did, for the report."""

    rounds: int = 0
    acknowledged: set[str] = field(default_factory=set)
    kills_mid_send: int = 0
    orphans_seen: int = 0
    lost: list[str] = field(default_factory=list)

    def note_lost(self, problems: list[str]) -> None:
        """Count acknowledged instances a problem names (missing or altered)."""
        self.lost += [uid for uid in self.acknowledged if uid not in self.lost and any(uid in p for p in problems)]

    def summary(self, total: int) -> str:
        return (
            f"crash: {self.rounds} SIGKILL rounds ({self.kills_mid_send} while storescu was sending), "
            f"{len(self.acknowledged)} distinct instances acknowledged of {total}, "
            f"{len(self.lost)} lost, at most {self.orphans_seen} unindexed objects left by a crash (replaced on resend)"
        )


def make_corpus(root: Path, studies: int, slices: int, size: int = 256) -> Corpus:
    """Synthetic CT studies, one per modality process."""
    from sample_studies.generate import get_patients, make_ct_series

    patients = get_patients()
    out: list[list[Path]] = []
    for i in range(studies):
        files = make_ct_series(root / f"study{i}", slices=slices, patient=patients[i % len(patients)],
                               size=size, study_key=f"crash-{i}")
        out.append(sorted(files))
    uids = {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for s in out for f in s}
    return Corpus(out, uids)


def _start_senders(server: PacsServer, corpus: Corpus) -> list[subprocess.Popen[str]]:
    procs = []
    for i, study in enumerate(corpus.studies):
        procs.append(subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", f"MOD{i}", "-aec", server.ae_title,
             "127.0.0.1", str(server.dicom_port), *map(str, study)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return procs


def acknowledged_files(output: str) -> list[Path]:
    """Files storescu got a success (or warning) response for, from its -v log."""
    acked, current = [], None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1) in ("Success", "Warning"):
                acked.append(current)
            current = None
    return acked


def check_data_dir(server: PacsServer, corpus: Corpus, acked: Iterable[str]) -> tuple[list[str], int]:
    """Offline checks after a crash: (problems, unindexed objects in the store).

    Every acknowledged instance is indexed and its stored dataset is
    byte-identical to what the modality sent; every index row has its object
    with the indexed size.
    """
    from sqlalchemy import select

    from pacs.index.models import Instance

    problems: list[str] = []
    by_uid = {uid: path for path, uid in corpus.sop_uid.items()}
    pacs = server.core()
    try:
        with pacs.engine.connect() as conn:
            rows = {r.sop_uid: r for r in conn.execute(
                select(Instance.sop_uid, Instance.storage_key, Instance.size_bytes))}
        for uid, row in rows.items():
            try:
                info = pacs.store.stat(row.storage_key)
            except Exception as exc:  # noqa: BLE001 - any failure here is the finding
                problems.append(f"index row {uid} has no object ({exc})")
                continue
            if info.size != row.size_bytes:
                problems.append(f"object of {uid} is {info.size} bytes, index says {row.size_bytes}")
        for uid in acked:
            row = rows.get(uid)
            if row is None:
                problems.append(f"acknowledged instance {uid} is not indexed")
                continue
            with pacs.store.open(row.storage_key) as stream:
                stored = dataset_bytes(stream.read())
            if stored != dataset_bytes(by_uid[uid].read_bytes()):
                problems.append(f"stored bytes of {uid} differ from what was sent")
        indexed_keys = {r.storage_key for r in rows.values()}
        orphans = sum(1 for obj in pacs.store.list() if obj.key not in indexed_keys)
    finally:
        pacs.close()
    return problems, orphans


def crash_round(server: PacsServer, corpus: Corpus, tally: Tally, rng: random.Random,
                max_delay: float) -> list[str]:
    """One start / send / SIGKILL / check cycle; returns the problems found."""
    server.start()
    senders = _start_senders(server, corpus)
    time.sleep(rng.uniform(0.05, max_delay))
    if any(p.poll() is None for p in senders):
        tally.kills_mid_send += 1
    server.stop(signal.SIGKILL)
    for proc in senders:
        output, _ = proc.communicate(timeout=120)
        tally.acknowledged.update(corpus.sop_uid[f] for f in acknowledged_files(output))
    tally.rounds += 1
    problems, orphans = check_data_dir(server, corpus, tally.acknowledged)
    tally.orphans_seen = max(tally.orphans_seen, orphans)
    tally.note_lost(problems)
    return problems


def final_round(server: PacsServer, corpus: Corpus, tally: Tally) -> list[str]:
    """Restart, let every modality resend to completion, and check everything."""
    server.start()
    senders = _start_senders(server, corpus)
    problems = []
    for i, proc in enumerate(senders):
        output, _ = proc.communicate(timeout=600)
        acked = acknowledged_files(output)
        tally.acknowledged.update(corpus.sop_uid[f] for f in acked)
        if proc.returncode != 0 or len(acked) != len(corpus.studies[i]):
            problems.append(f"resend of study {i} did not complete: rc={proc.returncode}\n{output[-2000:]}")
    server.stop()
    found, _ = check_data_dir(server, corpus, tally.acknowledged)
    problems += found
    stats = server.stats()
    if stats["instances"] != len(corpus.files):
        problems.append(f"{stats['instances']} instances indexed, {len(corpus.files)} sent")
    tally.note_lost(found)
    return problems
