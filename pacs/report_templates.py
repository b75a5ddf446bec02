"""Report templates ("mẫu kết quả"): the text a radiologist starts a report from.

Most reports of a Vietnamese department are a normal abdominal ultrasound,
a normal chest X-ray, a head CT without contrast... written from a template
and then edited. A template is the department's (owner '', shared, kept by
administrators and ``pacs template import``) or one radiologist's own. Its
name is unique per owner among the active ones; a search matches the name
without diacritics ("SIEU AM" finds "Siêu âm"); the templates fitting a
study come first (same modality and body part, then same modality).

A change names the version its author read (409 when another came between,
never overwritten); a template is archived, never deleted, so that a report
written from it stays explainable (its text was copied into the report, and
the report's audit event names the template and version). Texts are kept as
written: Vietnamese (UTF-8) round-trips.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from .errors import RefusedRequest
from .index.db import retry_write
from .index.models import ReportTemplate, User
from .names import fold

templates_t = ReportTemplate.__table__
users_t = User.__table__

# Limits a template's fields are held to (a clear 400 beyond them): a name
# fits a picker's line, a code its DICOM value (CS: 16 characters), a text
# is far longer than any report section yet no pasted document.
MAX_NAME = 120
MAX_CODE = 16
MAX_TEXT = 20_000
# Answers of a search, at most (a department keeps tens, not thousands).
MAX_RESULTS = 500
TEXT_FIELDS = ("name", "modality", "body_part", "findings", "impression")
# Control characters a text may hold: tab and line breaks (in findings and impression).
_LINE_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What separates the modalities one template names ("CR/DX", "CT, MR").
_MODALITY_SEPARATORS = re.compile(r"[/\\,\s]+")


class TemplateError(RefusedRequest):
    """A refused template operation, with the HTTP status it is answered with."""


@dataclass(frozen=True)
class TemplateText:
    """The fields of a template a person writes, checked (:func:`checked`)."""


    name: str
    modality: str = ""
    body_part: str = ""
    findings: str = ""
    impression: str = ""

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def name_key(name: str) -> str:
    """The form of a name compared for uniqueness: Unicode-normalised, case
    and spacing ignored, diacritics kept ("Bụng" and "Bùng" differ)."""
    return " ".join(unicodedata.normalize("NFC", name).casefold().split())


def _text(field: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TemplateError(f"{field} must be text, not {type(value).__name__}", 400)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TemplateError(f"{field} holds a character UTF-8 cannot write (a lone surrogate)", 400) from None
    # Composed (NFC): a Mac's or a phone's keyboard sends Vietnamese decomposed
    # ("ệ" as e + two marks), which counted three characters against the limits,
    # and a file saved so was "updated" by an import of the same text.
    return unicodedata.normalize("NFC", value)


def _one_line(field: str, value: Any, limit: int) -> str:
    text = _text(field, value).strip()
    if _ANY_CONTROL.search(text):
        raise TemplateError(f"{field} must be one line without control characters", 400)
    if len(text) > limit:
        raise TemplateError(f"{field} has {len(text)} characters, at most {limit}: {text[:40]!r}...", 400)
    return text


def checked(name: Any, modality: Any = "", body_part: Any = "", findings: Any = "",
            impression: Any = "") -> TemplateText:
    """The template's fields as stored, or a 400 saying what is wrong: a
    name (one line, at most MAX_NAME characters), a modality and a body part
    (free text, upper-cased, at most MAX_CODE characters: "US", "CR/DX",
    "ABDOMEN"), findings and impression (at most MAX_TEXT characters each,
    line breaks kept, no other control character; one of them not empty)."""
    clean_name = _one_line("name", name, MAX_NAME)
    if not clean_name:
        raise TemplateError("a template needs a name", 400)
    texts = {}
    for field, value in (("findings", findings), ("impression", impression)):
        text = _text(field, value)
        if (control := _LINE_CONTROLS.search(text)) is not None:
            raise TemplateError(f"{field} holds a control character (U+{ord(control.group()):04X}), likely pasted "
                                "from another program: remove it", 400)
        if len(text) > MAX_TEXT:
            raise TemplateError(f"{field} has {len(text)} characters, at most {MAX_TEXT}", 400)
        texts[field] = text
    if not (texts["findings"].strip() or texts["impression"].strip()):
        raise TemplateError(f"template {clean_name!r} has neither findings nor impression text", 400)
    return TemplateText(
        name=clean_name,
        modality=_one_line("modality", modality, MAX_CODE).upper(),
        body_part=_one_line("body_part", body_part, MAX_CODE).upper(),
        findings=texts["findings"], impression=texts["impression"],
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _modalities(value: str) -> set[str]:
    return {m for m in _MODALITY_SEPARATORS.split(value.upper()) if m}


def fit(row: Any, modalities: set[str], body_part: str) -> str:
    """How *row* fits a study of *modalities* and *body_part*: "study"
    (same modality and body part), "modality" (same modality) or ""."""
    if not modalities & _modalities(row.modality):
        return ""
    return "study" if body_part and row.body_part == body_part else "modality"


_FIT_RANK = {"study": 0, "modality": 1, "": 2}


def as_json(row: Any, fits: str | None = None) -> dict[str, Any]:
    """A template row as the API and the CLI show it."""
    answer = {
        "id": row.pk, "name": row.name, "modality": row.modality, "body_part": row.body_part,
        "findings": row.findings, "impression": row.impression, "owner": row.owner,
        "shared": row.owner == "", "version": row.version,
        "created_by": row.created_by, "created_at": _iso(row.created_at),
        "updated_by": row.updated_by, "updated_at": _iso(row.updated_at),
        "archived": row.archived_at is not None, "archived_at": _iso(row.archived_at), "archived_by": row.archived_by,
    }
    if fits is not None:
        answer["fits"] = fits
    return answer


def _whose(owner: str) -> str:
    return "the department" if not owner else owner


def describe(row: Any) -> str:
    """One line naming a template, for the audit trail."""
    return f"template #{row.pk} {row.name!r} v{row.version} ({_whose(row.owner)})"


def _like(word: str) -> str:
    return "%" + word.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


@dataclass
class ImportResult:
    """What an import did, by template name."""

    created: list[str]
    updated: list[str]
    unchanged: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        return {"created": self.created, "updated": self.updated, "unchanged": self.unchanged}


class TemplateService:
    """The report templates of the index."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- reading -------------------------------------------------------------------------
    def search(self, user: str, *, modality: str = "", body_part: str = "", q: str = "", everyone: bool = False,
               limit: int = 200) -> list[dict[str, Any]]:
        """The active templates *user* may use (their own and the
        department's; *everyone*: every owner's, for an administrator) whose
        name holds each word of *q* (diacritics and case ignored). Those
        fitting the study (*modality*, *body_part*) first: same modality and
        body part, then same modality, then the rest; in each, the user's
        own before the department's, then by name."""
        stmt = select(templates_t).where(templates_t.c.archived_at.is_(None))
        if not everyone:
            stmt = stmt.where(templates_t.c.owner.in_(("", user)))
        for word in fold(q).split():
            stmt = stmt.where(templates_t.c.name_folded.like(_like(word), escape="!"))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        wanted = _modalities(modality)
        part = body_part.strip().upper()
        fits = {row.pk: fit(row, wanted, part) for row in rows}

        def order(row: Any) -> tuple[int, int, str, str, int]:
            whose = 0 if row.owner == user else 1 if row.owner == "" else 2
            return _FIT_RANK[fits[row.pk]], whose, row.owner, row.name_folded, row.pk

        return [as_json(row, fits[row.pk]) for row in sorted(rows, key=order)[:max(0, limit)]]

    def get(self, template_id: int, user: str, *, admin: bool = False) -> dict[str, Any]:
        """One template, archived ones too (a report names the one it was
        written from); 404 for one *user* may not see."""
        with self.engine.connect() as conn:
            return as_json(self._visible(conn, template_id, user, admin))

    def department(self) -> list[dict[str, Any]]:
        """The department's active templates, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(templates_t)
                                .where(templates_t.c.owner == "", templates_t.c.archived_at.is_(None))
                                .order_by(templates_t.c.name_folded, templates_t.c.pk)).all()
        return [as_json(row) for row in rows]

    def describe(self, template_id: int, user: str, version: int | None = None) -> str:
        """One line naming the template *template_id* (archived too) for the
        audit event of a report *user* wrote from it at *version* (None: the
        current one). A template *user* may not see (a colleague's) is named
        as an unknown one: the trail would say the text came from it, and
        name it, on nothing but an id the client sent."""
        with self.engine.connect() as conn:
            row = conn.execute(select(templates_t).where(templates_t.c.pk == template_id)).first()
        if row is None or row.owner not in ("", user):
            return f"template #{template_id} (unknown)"
        if version is None or version == row.version:
            return describe(row)
        # Changed between the pick and the save: the text is that of the version picked.
        return f"template #{row.pk} {row.name!r} v{version} ({_whose(row.owner)}; v{row.version} since)"

    @staticmethod
    def _visible(conn: Connection, template_id: int, user: str, admin: bool) -> Any:
        row = conn.execute(select(templates_t).where(templates_t.c.pk == template_id)).first()
        if row is None or not (admin or row.owner in ("", user)):
            raise TemplateError(f"no report template {template_id}", 404)
        return row

    # -- writing -------------------------------------------------------------------------
    def create(self, text: TemplateText, *, owner: str, by: str, admin: bool = False) -> dict[str, Any]:
        """A new template of *owner* ('' the department's) written by *by*:
        a radiologist writes their own, an administrator any (403 otherwise);
        409 when the owner has an active template of that name."""
        if not admin and owner != by:
            raise TemplateError("a radiologist writes their own templates; the department's and other "
                                "radiologists' are an administrator's", 403)

        def once(conn: Connection) -> int:
            if owner and owner != by and not _is_user(conn, owner):
                raise TemplateError(f"no user {owner!r} to own the template", 400)
            now = datetime.now(UTC)
            return int(conn.execute(insert(templates_t).values(
                owner=owner, **self._columns(text), created_by=by, created_at=now, updated_by=by, updated_at=now,
                version=1, archived_by="",
            ).returning(templates_t.c.pk)).scalar_one())

        try:
            pk = retry_write(self.engine, once, what="report template creation")
        except IntegrityError:
            raise _taken(text.name, owner) from None
        with self.engine.connect() as conn:
            return as_json(conn.execute(select(templates_t).where(templates_t.c.pk == pk)).one())

    def update(self, template_id: int, changes: dict[str, Any], *, version: int, by: str,
               admin: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """Change the fields in *changes* (the others, and those None, kept)
        of a template at *version*; (before, after). 409 when it changed
        since that version or was archived, or its new name is taken; a
        radiologist changes their own only (403 for the department's)."""
        unknown = set(changes) - set(TEXT_FIELDS)
        if unknown:
            raise TemplateError(f"unknown template fields: {', '.join(sorted(unknown))}", 400)

        def once(conn: Connection) -> tuple[Any, Any]:
            row = self._writable(conn, template_id, by, admin)
            if row.archived_at is not None:
                raise TemplateError(f"{describe(row)} was archived by {row.archived_by or '?'}; it cannot change", 409)
            _check_version(row, version)
            text = checked(**{f: getattr(row, f) if changes.get(f) is None else changes[f] for f in TEXT_FIELDS})
            if TemplateText(**{f: getattr(row, f) for f in TEXT_FIELDS}) == text:
                return row, row  # nothing to change: no new version
            done = conn.execute(
                update(templates_t)
                .where(templates_t.c.pk == row.pk, templates_t.c.version == row.version,
                       templates_t.c.archived_at.is_(None))
                .values(**self._columns(text), updated_by=by, updated_at=datetime.now(UTC), version=row.version + 1)
            ).rowcount
            if done != 1:
                raise _changed_meanwhile()
            return row, conn.execute(select(templates_t).where(templates_t.c.pk == row.pk)).one()

        try:
            before, after = retry_write(self.engine, once, what="report template update")
        except IntegrityError:  # renamed to a name its owner has
            with self.engine.connect() as conn:
                owner = conn.execute(select(templates_t.c.owner).where(templates_t.c.pk == template_id)).scalar()
            raise _taken(str(changes.get("name", "")).strip(), owner or "") from None
        return as_json(before), as_json(after)

    def archive(self, template_id: int, *, by: str, admin: bool = False,
                version: int | None = None) -> tuple[dict[str, Any], bool]:
        """Archive a template (hidden from searches, still readable); with
        *version*, only that version (409 otherwise). (template, whether it
        was archived now: False when it already was)."""
        def once(conn: Connection) -> tuple[Any, bool]:
            row = self._writable(conn, template_id, by, admin)
            if row.archived_at is not None:
                return row, False
            if version is not None:
                _check_version(row, version)
            return self._archive_row(conn, row, by), True

        row, now = retry_write(self.engine, once, what="report template archive")
        return as_json(row), now

    def archive_named(self, name: str, *, by: str) -> dict[str, Any] | None:
        """Archive the department's active template named *name* (case and
        spacing ignored; typed without diacritics, as on a server's console,
        when that names one template only: 409 when it names several); None
        when there is none."""
        def once(conn: Connection) -> Any:
            active = select(templates_t).where(templates_t.c.owner == "", templates_t.c.archived_at.is_(None))
            row = conn.execute(active.where(templates_t.c.name_key == name_key(name))).first()
            # Only a name typed without diacritics stands for one with them: "Mẩu" is not "Mẫu".
            if row is None and name_key(fold(name)) == name_key(name):
                alike = conn.execute(active.where(templates_t.c.name_folded == fold(name))).all()
                if len(alike) > 1:
                    raise TemplateError(f"{name!r} without diacritics names {len(alike)} templates: "
                                        + ", ".join(repr(r.name) for r in alike) + "; give the name as written", 409)
                row = alike[0] if alike else None
            return None if row is None else self._archive_row(conn, row, by)

        row = retry_write(self.engine, once, what="report template archive")
        return None if row is None else as_json(row)

    def import_department(self, texts: list[TemplateText], *, by: str) -> ImportResult:
        """The department's set from a shared file: a template of a name the
        department has is updated (when its text differs), others created;
        all of them or none (one transaction). Two of one name: 400."""
        seen: dict[str, str] = {}
        for text in texts:
            key = name_key(text.name)
            if key in seen:
                raise TemplateError(f"the name {text.name!r} is given twice (also as {seen[key]!r})", 400)
            seen[key] = text.name

        def once(conn: Connection) -> ImportResult:
            result = ImportResult([], [], [])
            now = datetime.now(UTC)
            rows = conn.execute(select(templates_t).where(templates_t.c.owner == "",
                                                          templates_t.c.archived_at.is_(None))).all()
            have = {row.name_key: row for row in rows}
            for text in texts:
                row = have.get(name_key(text.name))
                if row is None:
                    conn.execute(insert(templates_t).values(
                        owner="", **self._columns(text), created_by=by, created_at=now, updated_by=by, updated_at=now,
                        version=1, archived_by=""))
                    result.created.append(text.name)
                elif TemplateText(**{f: getattr(row, f) for f in TEXT_FIELDS}) == text:
                    result.unchanged.append(text.name)
                else:
                    done = conn.execute(update(templates_t).where(
                        templates_t.c.pk == row.pk, templates_t.c.version == row.version,
                        templates_t.c.archived_at.is_(None),
                    ).values(**self._columns(text), updated_by=by, updated_at=now, version=row.version + 1)).rowcount
                    if done != 1:
                        raise _changed_meanwhile()
                    result.updated.append(text.name)
            return result

        try:
            return retry_write(self.engine, once, what="report template import")
        except IntegrityError:  # a template of one of these names created at the same moment
            raise TemplateError("a department template of one of these names was created at the same moment: "
                                "run the import again", 409) from None

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _columns(text: TemplateText) -> dict[str, str]:
        return {**text.as_dict(), "name_key": name_key(text.name), "name_folded": fold(text.name)}

    def _writable(self, conn: Connection, template_id: int, by: str, admin: bool) -> Any:
        """The template, if *by* may change it: their own, any for an administrator."""
        row = self._visible(conn, template_id, by, admin)
        if not admin and row.owner != by:
            raise TemplateError("the department's templates are changed by an administrator", 403)
        return row

    @staticmethod
    def _archive_row(conn: Connection, row: Any, by: str) -> Any:
        done = conn.execute(
            update(templates_t).where(templates_t.c.pk == row.pk, templates_t.c.version == row.version,
                                      templates_t.c.archived_at.is_(None))
            .values(archived_at=datetime.now(UTC), archived_by=by, version=row.version + 1)
        ).rowcount
        if done != 1:
            raise _changed_meanwhile()
        return conn.execute(select(templates_t).where(templates_t.c.pk == row.pk)).one()


def _is_user(conn: Connection, username: str) -> bool:
    return conn.execute(select(users_t.c.pk).where(users_t.c.username == username)).first() is not None


def _check_version(row: Any, version: int) -> None:
    """409 when *row* is no longer at the *version* its author read."""
    if row.version != version:
        raise TemplateError(
            f"{describe(row)} was changed by {row.updated_by or '?'} at {_iso(row.updated_at)} after you read "
            f"version {version}: reload it, compare, then save again", 409)


def _changed_meanwhile() -> TemplateError:
    return TemplateError("the template was changed at the same moment by someone else: reload it and try again", 409)


def _taken(name: str, owner: str) -> TemplateError:
    whose = "the department" if not owner else owner
    return TemplateError(f"{whose} already has a template named {name!r} (names are unique per owner, "
                         "case and spacing ignored): choose another name or change that one", 409)
