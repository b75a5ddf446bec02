"""`pacs prefetch`: the queue of prior studies fetched from the old PACS for
new orders (pacs.prefetch). ``list`` shows the jobs (and what came for
each), ``retry`` makes waiting or dead jobs due now, ``run --patient ID``
fetches one patient's priors at once. Registered by :func:`register` from
pacs.cli. Exit codes: 0 done, 1 a job left unfinished or not found."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from typing import Any

from .console import TextTable, err, out


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add the prefetch subcommands to the `pacs` parser."""
    p = sub.add_parser("prefetch", help="prior studies fetched from the old PACS for new orders: list, retry, run")
    s = p.add_subparsers(dest="prefetch_command", required=True)
    q = s.add_parser("list", help="jobs per state and the latest jobs, with what came for each")
    common(q, json_flag=True)
    q.add_argument("--state", choices=["pending", "running", "done", "dead"])
    q.add_argument("--limit", type=int, default=100, help="jobs listed, newest first (default 100)")
    q = s.add_parser("retry", help="try jobs again now (a waiting or dead one, or every dead one)")
    common(q, json_flag=True)
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, dest="job_id", metavar="N", help="job N (pending or dead)")
    which.add_argument("--all-dead", action="store_true", help="every dead job")
    q = s.add_parser("run", help="fetch one patient's priors now (C-MOVE needs pacs serve running to receive)")
    common(q, json_flag=True)
    q.add_argument("--patient", required=True, metavar="ID", help="the patient ID (its other IDs are searched too)")
    q.add_argument("--issuer", help="its issuer, when several patients here have that ID")
    p.set_defaults(func=cmd_prefetch)


def cmd_prefetch(args: argparse.Namespace) -> int:
    """pacs prefetch list|retry|run."""
    from .cli_maintenance import _open

    pacs = _open(args)
    try:
        if args.prefetch_command == "list":
            return _list(pacs, args)
        if args.prefetch_command == "retry":
            return _retry(pacs, args)
        return _run(pacs, args)
    finally:
        pacs.close()


def _list(pacs: Any, args: argparse.Namespace) -> int:
    from .audit import patient_chunks, patient_cx
    from .cli import audit_command
    from .cli_maintenance import _counts, _emit
    from .prefetch import jobs

    counts = jobs.depth(pacs.engine)
    listed = jobs.list_jobs(pacs.engine, args.state or "", args.limit)
    # The patients whose jobs were shown, as `pacs orders unmatched` names them.
    detail = f"pacs prefetch list: {len(listed)} jobs listed"
    for chunk in patient_chunks(patient_cx(j["patient_id"], j["issuer"]) for j in listed) or [""]:
        audit_command(pacs, "query", detail, patient_id=chunk)

    def human() -> None:
        from .timezones import shown

        _counts("prefetch jobs", sorted(counts.items()))
        table = TextTable(title=f"jobs{' ' + args.state if args.state else ''} (newest first)")
        for col in ("id", "order", "patient", "state", "tries", "next try", "priors", "error"):
            table.add_column(col, overflow="fold")
        for j in listed:
            priors = f"{j['retrieved']} came, {j['already_here']} here, {j['missing']} missing"
            table.add_row(str(j["id"]), j["accession"] or "(by hand)", j["patient_id"], j["state"],
                          str(j["attempts"]), shown(j["next_attempt_at"], pacs.settings) if j["next_attempt_at"]
                          else "", priors, j["last_error"][:80])
        out.print(table)

    _emit(args, {"counts": counts, "jobs": listed}, human)
    return 0


def _retry(pacs: Any, args: argparse.Namespace) -> int:
    from .cli_maintenance import _retried
    from .prefetch import jobs

    retried = jobs.retry(pacs.engine, pk=args.job_id if not args.all_dead else None)
    return _retried(pacs, args, retried, args.job_id, action="prefetch-retry", item="prefetch job",
                    done="due again now", many="job(s)", state_of=lambda pk: jobs.state_of(pacs.engine, pk),
                    due="pending or dead", listing="pacs prefetch list")


def _patient(pacs: Any, patient_id: str, issuer: str | None) -> tuple[str, list[tuple[str, str, str]]] | str:
    """(issuer, other identifiers) of the patient here with *patient_id*
    (none known: as given, without other IDs); a message when several
    patients have that ID and *issuer* does not say which."""
    from sqlalchemy import select

    from .index.models import Patient, PatientIdentifier

    patients, identifiers = Patient.__table__, PatientIdentifier.__table__
    query = select(patients.c.pk, patients.c.issuer).where(patients.c.patient_id == patient_id)
    if issuer is not None:
        query = query.where(patients.c.issuer == issuer)
    with pacs.engine.connect() as conn:
        rows = conn.execute(query.limit(10)).all()
        if len(rows) > 1:
            issuers = ", ".join(repr(r.issuer) for r in rows)
            return f"several patients have ID {patient_id} (issuers {issuers}): name one with --issuer"
        if not rows:
            return issuer or "", []
        others = conn.execute(select(identifiers.c.value, identifiers.c.issuer, identifiers.c.id_type)
                              .where(identifiers.c.patient_pk == rows[0].pk).order_by(identifiers.c.pk)).all()
    return rows[0].issuer, [(o.value, o.issuer, o.id_type) for o in others]


def _run(pacs: Any, args: argparse.Namespace) -> int:
    from .cli_maintenance import _emit
    from .maintenance.common import os_user
    from .prefetch import jobs
    from .prefetch.run import lease, run_claimed

    if not pacs.settings.prefetch_sources:
        err.print("[red]no prefetch sources: set prefetch_sources (PACS_PREFETCH_SOURCES=OLDPACS, or OLDPACS:get) "
                  "to the old PACS's AE title, registered with pacs ae add[/red]")
        return 2
    if not args.patient.strip() or any(c in args.patient for c in "*?\\"):
        # The old PACS is never asked by such a value (it would match other
        # patients): the run found nothing and said so, exit 0.
        from rich.markup import escape

        err.print(f"[red]--patient '{escape(args.patient)}': one patient's ID, not a pattern (*, ? or \\ would "
                  "match other patients; an empty one every patient)[/red]")
        return 2
    found = _patient(pacs, args.patient, args.issuer)
    if isinstance(found, str):
        err.print(f"[red]{found}[/red]")
        return 2
    issuer, others = found
    user = os_user()
    # Not this node's name: a `pacs serve` restarting here gives back only its own jobs.
    job = jobs.enqueue_claimed(pacs.engine, f"pacs-prefetch-run:{user}@{socket.gethostname()}", lease(),
                               patient_id=args.patient, issuer=issuer, other_ids=others)

    def shown(uid: str, entry: dict[str, Any]) -> None:
        if not args.json:
            colour = {"pulled": "green", "complete": "green"}.get(entry["state"], "red")
            out.print(f"[{colour}]{entry['state']:10}[/{colour}] {entry['date'] or '--------'} {entry['source']} "
                      f"{entry['patient_id']} {uid} +{entry['instances']} {entry['detail']}")

    state = run_claimed(pacs, job, user=user, role="", on_study=shown)
    pacs.audit.flush()
    (record,) = jobs.list_jobs(pacs.engine, pk=job.pk)

    def human() -> None:
        out.print(f"prefetch job {job.pk}: {record['found']} prior(s) found at "
                  f"{', '.join(record['searched']) or 'no source'}, {record['chosen']} chosen: "
                  f"{record['retrieved']} retrieved ({record['instances']} instances), {record['already_here']} "
                  f"already here, {record['missing']} missing"
                  + (f", {record['filed']} filed under the patient (found by another of its IDs)"
                     if record["filed"] else ""))
        if state != "done":
            err.print(f"[yellow]{state or 'taken over'}: {record['last_error'][:300]}"
                      f"{'; pacs serve tries it again later' if state == 'pending' else ''}[/yellow]")

    _emit(args, record, human)
    return 0 if state == "done" else 1
