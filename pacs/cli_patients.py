"""``pacs patient``: correct a patient's demographics, or merge a duplicate
registration, where no HIS does it (the technologist typed the name at the
modality). Registered by :func:`register` from pacs.cli.

    pacs patient show ID [--issuer I] [--json]
    pacs patient update ID [--issuer I] [--name N] [--birth-date YYYYMMDD] [--sex M|F|O] --reason TEXT
    pacs patient merge ID [--issuer I] --from PRIOR_ID [--from-issuer I] --reason TEXT [--yes]
    pacs patient move-study STUDY_UID --to ID [--issuer I] [--name N ...] --reason TEXT [--yes]

The same service as ADT^A08 / ADT^A40 and ``PUT /api/patients/{id}`` /
``POST /api/patients/merge``: stored bytes never change; the studies'
corrections are applied on retrieval, and queries find the new values at
once. Audited by the operating system account that ran them
(patient-update, patient-merge, study-move). A merge cannot be undone:
without --yes it, and a study's move, only show what they would do.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from .console import TextTable, fail, out


def cmd_patient(args: argparse.Namespace) -> int:
    """Run ``pacs patient show|update|merge``: 0 done (or a dry run), 1 no
    such patient, 2 refused (nothing changed)."""
    from .cli import _open
    from .orders import OrderService

    pacs = _open(args)
    try:
        service = OrderService(pacs.engine, order_status=pacs.settings.his_order_status)
        if args.patient_command == "show":
            return _show(args, pacs, service)
        if args.patient_command == "update":
            return _update(args, pacs, service)
        if args.patient_command == "move-study":
            return _move_study(args, pacs, service)
        return _merge(args, pacs, service)
    finally:
        pacs.close()


def _audit(pacs: Any, action: str, detail: str, patients: list[str], outcome: str = "success",
           study: str = "") -> None:
    from .audit import patient_chunks
    from .cli import audit_command

    for chunk in patient_chunks([p for p in dict.fromkeys(patients) if p]) or [""]:
        audit_command(pacs, action, detail, outcome, patient_id=chunk, study_uid=study)


def _print_patient(args: argparse.Namespace, patient: dict[str, Any], title: str) -> None:
    if args.json:
        print(json.dumps(patient, ensure_ascii=False))
        return
    table = TextTable(title=title)
    for column in ("ID", "issuer", "name", "birth date", "sex", "other IDs", "studies", "withdrawn"):
        table.add_column(column)
    others = ", ".join(o["value"] + (f" ({o['issuer']})" if o["issuer"] else "") for o in patient["other_ids"])
    table.add_row(patient["id"], patient["issuer"], patient["name"], patient["birth_date"], patient["sex"], others,
                  str(patient["studies"]), str(patient["withdrawn"]))
    out.print(table)


def _no_patient(service: Any, patient_id: str, issuer: str, hint: str = "") -> int:
    """Say that no patient has that key, and where it is instead: the
    administrator types the ID printed on the film, without the issuer the
    modality sent, and "no patient" read as "not in the archive". Exit 1."""
    from .audit import patient_cx

    issuers, merged_into = service.whereabouts(patient_id, issuer)
    where = [f"merged into {merged_into}"] if merged_into else []
    where += [f"held under --issuer {i}" if i else "held without issuer (--issuer '')" for i in issuers]
    fail(f"no patient {patient_cx(patient_id, issuer)}" + (f" ({'; '.join(where)})" if where else hint))
    return 1


def _show(args: argparse.Namespace, pacs: Any, service: Any) -> int:
    from .audit import patient_cx

    patient = service.patient(args.id, args.issuer)
    _audit(pacs, "query", "pacs patient show", [patient_cx(args.id, args.issuer)],
           "success" if patient else "failure")
    if patient is None:
        return _no_patient(service, args.id, args.issuer)
    _print_patient(args, patient, "patient")
    return 0


def _update(args: argparse.Namespace, pacs: Any, service: Any) -> int:
    from .audit import patient_cx
    from .maintenance.common import os_user
    from .orders import OrderError, PatientInfo, change_reason
    from .query.matching import is_date

    who = patient_cx(args.id, args.issuer)
    if args.name is None and args.birth_date is None and args.sex is None:
        fail("nothing to change: give --name, --birth-date or --sex")
        return 2
    if args.birth_date and not is_date(args.birth_date):
        # Not refused, it went to HL7's rule for partial dates (PID-7 "1985"), which deleted the stored date.
        fail(f"refused: --birth-date {args.birth_date[:20]!r} is not a valid YYYYMMDD ('' removes it)")
        return 2
    if service.patient(args.id, args.issuer) is None:
        return _no_patient(service, args.id, args.issuer, " (a new patient comes with their first study or order)")
    info = PatientInfo(patient_id=args.id, issuer=args.issuer, name=args.name, birth_date=args.birth_date,
                       sex=args.sex, reason=change_reason("patient update", os_user(), args.reason))
    detail = f"pacs patient update: {args.reason}"
    try:
        updated = service.correct_patient(info)
    except OrderError as exc:
        _audit(pacs, "patient-update", f"{detail}: refused: {exc}", [who], "failure")
        fail(f"refused: {exc}")
        return 2
    _audit(pacs, "patient-update", detail, [who])
    _print_patient(args, updated, "patient updated")
    return 0


def _merge(args: argparse.Namespace, pacs: Any, service: Any) -> int:
    from .audit import patient_cx
    from .maintenance.common import os_user
    from .orders import OrderError, PatientInfo, change_reason

    kept, prior = service.patient(args.id, args.issuer), service.patient(args.from_id, args.from_issuer)
    who, whom = patient_cx(args.id, args.issuer), patient_cx(args.from_id, args.from_issuer)
    for (patient_id, issuer), found in (((args.id, args.issuer), kept), ((args.from_id, args.from_issuer), prior)):
        if found is None:
            return _no_patient(service, patient_id, issuer)
    if (args.id, args.issuer) == (args.from_id, args.from_issuer):
        fail("a patient cannot be merged into itself")
        return 2
    surviving = PatientInfo(patient_id=args.id, issuer=args.issuer,
                            reason=change_reason("patient merge", os_user(), args.reason))
    if not args.yes:
        # The merge itself, rolled back: refused now, it would be refused with --yes.
        try:
            moving = service.merge_preview(surviving, [(args.from_id, args.from_issuer)])
        except OrderError as exc:
            fail(f"would be refused: {exc}")
            return 2
        if args.json:
            print(json.dumps({"merged": False, "moved_studies": moving, "prior": prior, "patient": kept},
                             ensure_ascii=False))
            return 0
        _print_patient(args, prior, f"would be merged away (its {moving} studies move): {whom}")
        _print_patient(args, kept, f"into: {who}")
        out.print("nothing changed: run again with --yes to merge (it cannot be undone)")
        return 0
    detail = f"pacs patient merge: {whom} into {who}: {args.reason}"
    try:
        moved, merged = service.merge_into(surviving, [(args.from_id, args.from_issuer)])
    except OrderError as exc:
        _audit(pacs, "patient-merge", f"{detail}: refused: {exc}", [who, whom], "failure")
        fail(f"refused: {exc}")
        return 2
    _audit(pacs, "patient-merge", f"{detail}; {moved} studies moved", [who, whom])
    if args.json:
        print(json.dumps({"merged": True, "moved_studies": moved, "patient": merged}, ensure_ascii=False))
    else:
        _print_patient(args, merged, f"merged: {moved} studies moved")
    return 0


def _move_study(args: argparse.Namespace, pacs: Any, service: Any) -> int:
    from .audit import patient_cx
    from .header import valid_uid
    from .maintenance.common import os_user
    from .orders import OrderError, PatientInfo, change_reason
    from .query.matching import is_date

    if not valid_uid(args.study):
        fail(f"refused: {args.study[:70]!r} is not a UID")
        return 2
    if args.birth_date and not is_date(args.birth_date):
        fail(f"refused: --birth-date {args.birth_date[:20]!r} is not a valid YYYYMMDD")
        return 2
    info = PatientInfo(patient_id=args.to, issuer=args.issuer, name=args.name, birth_date=args.birth_date,
                       sex=args.sex, reason=change_reason("study moved to another patient", os_user(), args.reason))
    who, previous = patient_cx(args.to, args.issuer), service.study_patient(args.study)
    detail = f"pacs patient move-study {args.study}: from {previous} to {who}: {args.reason}"
    try:
        moved = service.move_study(args.study, info, dry_run=not args.yes)
    except OrderError as exc:
        if args.yes:
            _audit(pacs, "study-move", f"{detail}: refused: {exc}", [who, previous], "failure", args.study)
        fail(("refused: " if args.yes else "would be refused: ") + str(exc))
        return 1 if exc.http_status == 404 else 2
    if args.yes:
        # The patient it is filed under now, as found (an ID typed without its issuer, one merged
        # away), and the one it left, as the HTTP route's event names them.
        who = patient_cx(moved["patient"]["id"], moved["patient"]["issuer"])
        previous = moved["previous"] or previous
        detail = f"pacs patient move-study {args.study}: from {previous} to {who}: {args.reason}"
        _audit(pacs, "study-move", detail, [who, previous], study=args.study)
    if args.json:
        print(json.dumps({**moved, "moved": args.yes}, ensure_ascii=False))
    elif args.yes:
        _print_patient(args, moved["patient"], f"study {args.study} moved from {moved['previous']} to")
    else:
        _print_patient(args, moved["patient"], f"study {args.study} would move from {moved['previous']} to")
    if moved["report_resent"] and not args.json:
        out.print(f"its signed report {'goes' if args.yes else 'would go'} to the HIS posted as wrong for "
                  f"{moved['previous']}, then again for the patient it moved to")
    if not (args.yes or args.json):
        out.print("nothing changed: run again with --yes to move it")
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs patient`` to the `pacs` parser."""
    p = sub.add_parser("patient", help="correct a patient's demographics, merge a duplicate registration, "
                                          "or move a study to its patient")
    p_sub = p.add_subparsers(dest="patient_command", required=True)

    q = p_sub.add_parser("show", help="a patient as the index holds them")
    common(q, json_flag=True)
    q.add_argument("id", help="Patient ID")
    q.add_argument("--issuer", default="", help="Issuer of the Patient ID")

    q = p_sub.add_parser("update", help="change a patient's name, birth date or sex (their stored studies are "
                                        "retrieved with the new values; the bytes stay as received)")
    common(q, json_flag=True)
    q.add_argument("id", help="Patient ID")
    q.add_argument("--issuer", default="", help="Issuer of the Patient ID")
    q.add_argument("--name", help="DICOM PN: Family^Given (Nguyễn^Văn An); '' removes it")
    q.add_argument("--birth-date", help="YYYYMMDD; '' removes it")
    q.add_argument("--sex", choices=("M", "F", "O", ""), help="M, F or O; '' removes it")
    q.add_argument("--reason", required=True, help="why (audited, and kept with the studies' corrections)")

    q = p_sub.add_parser("merge", help="merge a duplicate registration (--from) into the patient ID: its studies "
                                       "move there (cannot be undone; a dry run without --yes)")
    common(q, json_flag=True)
    q.add_argument("id", help="the Patient ID that stays")
    q.add_argument("--issuer", default="", help="its issuer")
    q.add_argument("--from", dest="from_id", required=True, help="the Patient ID merged away")
    q.add_argument("--from-issuer", default="", help="its issuer")
    q.add_argument("--reason", required=True, help="why (audited, and kept with the studies' corrections)")
    q.add_argument("--yes", action="store_true", help="merge (without it: show what would be merged)")

    q = p_sub.add_parser("move-study", help="file one study under another patient (the wrong patient chosen or "
                                            "typed at the modality; a dry run without --yes)")
    common(q, json_flag=True)
    q.add_argument("study", help="Study Instance UID")
    q.add_argument("--to", required=True, help="the Patient ID it belongs to")
    q.add_argument("--issuer", default="", help="its issuer")
    q.add_argument("--name", help="a new patient's name, DICOM PN: Family^Given (Nguyễn^Văn An)")
    q.add_argument("--birth-date", help="a new patient's birth date, YYYYMMDD")
    q.add_argument("--sex", choices=("M", "F", "O"), help="a new patient's sex")
    q.add_argument("--reason", required=True, help="why (audited, and kept with the study's corrections)")
    q.add_argument("--yes", action="store_true", help="move it (without it: show what would happen)")
    p.set_defaults(func=cmd_patient)
