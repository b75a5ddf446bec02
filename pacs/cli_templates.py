"""``pacs template``: the department's report templates ("mẫu kết quả").
Registered by :func:`register` from pacs.cli.

    pacs template list [--all] [--json]
    pacs template import FILE.json|FILE.toml      (or --starter: the shipped Vietnamese set)
    pacs template export FILE.json|FILE.toml|-
    pacs template remove NAME

Import and remove change the department's set (owner ''), audited by the
operating system account that ran them (template-create, template-update,
template-archive); radiologists keep their own templates in the viewer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .console import TextTable, fail, out


def cmd_template(args: argparse.Namespace) -> int:
    """Run ``pacs template list|import|export|remove``: 0 done, 1 nothing to
    remove, 2 a file refused (nothing imported)."""
    from .cli import _open
    from .report_templates import TemplateError, TemplateService

    pacs = _open(args)
    try:
        service = TemplateService(pacs.engine)
        command = args.template_command
        try:
            if command == "list":
                return _list(args, service)
            if command == "import":
                return _import(args, pacs, service)
            if command == "export":
                return _export(args, service)
            return _remove(args, pacs, service)
        except TemplateError as exc:
            fail(f"error: {exc}")
            return 2
    finally:
        pacs.close()


def _list(args: argparse.Namespace, service: Any) -> int:
    templates = service.search("", everyone=True, limit=10_000) if args.all else service.department()
    if args.json:
        print(json.dumps(templates, ensure_ascii=False))
        return 0
    table = TextTable(title="report templates" if args.all else "the department's report templates")
    for column in ("id", "name", "modality", "body part", "owner", "version", "updated"):
        table.add_column(column)
    for t in templates:
        table.add_row(str(t["id"]), t["name"], t["modality"], t["body_part"], t["owner"] or "(department)",
                      str(t["version"]), f"{(t['updated_at'] or '')[:16]} {t['updated_by']}")
    out.print(table)
    return 0


def _import(args: argparse.Namespace, pacs: Any, service: Any) -> int:
    from .cli import audit_command
    from .maintenance.common import os_user
    from .template_files import read_templates, starter_templates

    source = "the starter set" if args.starter else str(args.file.resolve())
    try:
        texts = starter_templates() if args.starter else read_templates(args.file)
        result = service.import_department(texts, by=os_user())
    except Exception as exc:
        audit_command(pacs, "template-create", f"import of {source} refused: {exc}", "failure")
        raise
    for name in result.created:
        audit_command(pacs, "template-create", f"department template {name!r} from {source}")
    for name in result.updated:
        audit_command(pacs, "template-update", f"department template {name!r} from {source}")
    summary = result.as_dict()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        out.print(f"{len(result.created)} created, {len(result.updated)} updated, "
                  f"{len(result.unchanged)} unchanged (from {source})")
        for verb, names in summary.items():
            for name in names:
                print(f"  {verb}: {name}")
    return 0


def _export(args: argparse.Namespace, service: Any) -> int:
    from .template_files import templates_json, write_templates

    templates = service.department()
    if str(args.file) == "-":
        sys.stdout.write(templates_json(templates))
        return 0
    write_templates(args.file, templates)
    print(f"{len(templates)} templates written to {args.file}", file=sys.stderr)
    return 0


def _remove(args: argparse.Namespace, pacs: Any, service: Any) -> int:
    from .cli import audit_command
    from .maintenance.common import os_user

    archived = service.archive_named(args.name, by=os_user())
    if archived is None:
        audit_command(pacs, "template-archive", f"no department template named {args.name!r}", "failure")
        fail(f"no department template named {args.name!r} (pacs template list)")
        return 1
    audit_command(pacs, "template-archive", f"department template #{archived['id']} {archived['name']!r} archived")
    if args.json:
        print(json.dumps(archived, ensure_ascii=False))
    else:
        out.print(f"archived: {archived['name']} (kept for the reports written from it; no longer offered)")
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs template`` to the `pacs` parser."""
    p = sub.add_parser("template", help="the department's report templates (mẫu kết quả)")
    t_sub = p.add_subparsers(dest="template_command", required=True)

    q = t_sub.add_parser("list", help="the department's templates (--all: the radiologists' own too)")
    common(q, json_flag=True)
    q.add_argument("--all", action="store_true", help="every owner's templates")

    q = t_sub.add_parser("import", help="add or update department templates from a JSON or TOML file "
                                        "(a template of an existing name is updated); all or nothing")
    common(q, json_flag=True)
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path, help="FILE.json (a list) or FILE.toml ([[template]] tables)")
    source.add_argument("--starter", action="store_true",
                        help="the starter set shipped in Vietnamese (normal abdominal and thyroid ultrasound, "
                             "chest X-ray, head CT)")

    q = t_sub.add_parser("export", help="write the department's templates to FILE.json or FILE.toml "
                                        "(- : JSON on standard output), to share with another hospital")
    common(q)
    q.add_argument("file", type=Path)

    q = t_sub.add_parser("remove", help="archive the department's template NAME (no longer offered; "
                                        "kept for the reports written from it)")
    common(q, json_flag=True)
    q.add_argument("name")
    p.set_defaults(func=cmd_template)
