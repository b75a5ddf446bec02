"""Report template files: a department's set as JSON or TOML, and the starter set.

A hospital shares its set as a file (``pacs template export FILE``, then
``pacs template import FILE`` elsewhere). JSON: a list of templates (or an
object with a ``templates`` list); TOML: ``[[template]]`` tables. Each
template has ``name`` and ``findings`` and/or ``impression``, optionally
``modality`` and ``body_part``; any other key is refused (a typo such as
``finding`` would otherwise import an empty text). Files are UTF-8 (a BOM,
as Windows Notepad writes, is accepted); Vietnamese text is kept as written.
"""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .atomic_files import write_atomic
from .report_templates import TEXT_FIELDS, TemplateError, TemplateText, checked

FORMATS = (".json", ".toml")
STARTER = "starter_templates.toml"


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise TemplateError(f"{path}: a template file is .json or .toml, not {suffix or 'without extension'!r}", 400)
    return suffix


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are given once each: json keeps the last of
    two "findings" without a word (TOML refuses them), and an import would
    silently drop the text of the first."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice!r} is given twice in one object")
    return document


def parse_templates(data: bytes, kind: str, source: str) -> list[TemplateText]:
    """The templates of a file's bytes (*kind* ``.json`` or ``.toml``),
    each checked; a 400 naming *source* and the template at fault."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{source}: not UTF-8 (byte {exc.start}): save the file as UTF-8", 400) from None
    try:
        document: Any = json.loads(text, object_pairs_hook=_once_each) if kind == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(f"{source}: not valid {kind[1:].upper()}: {exc}", 400) from None
    except RecursionError:  # "[[[[..." thousands deep: no template file, and no traceback for it
        raise TemplateError(f"{source}: not a template file (lists or tables nested too deeply)", 400) from None
    if isinstance(document, dict):
        keys = [k for k in ("template", "templates") if k in document]
        if len(keys) != 1 or len(document) != 1:
            raise TemplateError(f"{source}: expected a list of templates ([[template]] tables in TOML, "
                                "a list or {\"templates\": [...]} in JSON)", 400)
        document = document[keys[0]]
    if not isinstance(document, list):
        raise TemplateError(f"{source}: expected a list of templates", 400)
    templates = []
    for number, item in enumerate(document, 1):
        where = f"{source}: template {number}"
        if not isinstance(item, dict):
            raise TemplateError(f"{where}: expected a table of name, modality, body_part, findings, impression", 400)
        if isinstance(item.get("name"), str):
            where += f" ({item['name'][:60]!r})"
        unknown = sorted(set(item) - set(TEXT_FIELDS))
        if unknown:
            raise TemplateError(f"{where}: unknown keys {', '.join(map(repr, unknown))} "
                                f"(a template has {', '.join(TEXT_FIELDS)})", 400)
        try:
            templates.append(checked(**{field: item.get(field) for field in TEXT_FIELDS}))
        except TemplateError as exc:
            raise TemplateError(f"{where}: {exc}", 400) from None
    return templates


def read_templates(path: Path) -> list[TemplateText]:
    """The templates of the file *path* (JSON or TOML, by its extension)."""
    kind = _format_of(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TemplateError(f"cannot read {path}: {exc.strerror or exc}", 400) from None
    return parse_templates(data, kind, str(path))


def starter_templates() -> list[TemplateText]:
    """The starter set shipped with the package (pacs/starter_templates.toml)."""
    data = resources.files("pacs").joinpath(STARTER).read_bytes()
    return parse_templates(data, ".toml", STARTER)


# TOML basic-string escapes: backslash, quote and every control character
# but tab and line feed (a carriage return alone would not survive).
_TOML_ESCAPE = re.compile(r'[\\"\x00-\x08\x0b-\x1f\x7f]')


def _toml_string(value: str) -> str:
    """*value* as a TOML string, read back exactly: a multi-line basic
    string when it has line breaks (readable where a hospital edits it),
    else a basic one."""
    def escape(match: re.Match[str]) -> str:
        c = match.group()
        return "\\" + c if c in '\\"' else f"\\u{ord(c):04X}"

    body = _TOML_ESCAPE.sub(escape, value)
    # The line break right after the opening quotes is not part of the value (TOML 1.0).
    return f'"""\n{body}"""' if "\n" in value else f'"{body}"'


def templates_toml(templates: list[dict[str, Any]]) -> str:
    """*templates* (dicts with the template fields) as ``[[template]]`` tables."""
    parts = ["# Report templates of filmless-pacs: pacs template import FILE.toml\n"]
    for template in templates:
        lines = ["", "[[template]]"]
        lines += [f"{field} = {_toml_string(str(template.get(field) or ''))}" for field in TEXT_FIELDS
                  if template.get(field) or field == "name"]
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def templates_json(templates: list[dict[str, Any]]) -> str:
    """*templates* as a JSON list of objects with the template fields."""
    items = [{field: template.get(field) or "" for field in TEXT_FIELDS} for template in templates]
    return json.dumps(items, ensure_ascii=False, indent=2) + "\n"


def write_templates(path: Path, templates: list[dict[str, Any]]) -> None:
    """Write *templates* to *path* (JSON or TOML, by its extension), whole or
    not at all."""
    kind = _format_of(path)
    text = templates_json(templates) if kind == ".json" else templates_toml(templates)
    try:
        write_atomic(path, text.encode("utf-8"), 0o644)
    except OSError as exc:
        raise TemplateError(f"cannot write {path}: {exc.strerror or exc}", 400) from None
