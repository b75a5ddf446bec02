"""DICOM attribute matching (PS3.4 C.2.2.2) translated to SQL, in one place.

Single value, universal (empty: no condition), wildcard (``*``, ``?``),
range (dates, times), list of UIDs or values (backslash-separated). Person
names are matched on their folded form: case- and diacritic-insensitive, so
"NGUYEN*", "nguyễn*" and "Nguyễn^Văn An" all find "Nguyễn^Văn An". A query
without ``^`` is matched against the name with its components read as words
("NGUYEN VAN AN"), which is how people type names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import date
from typing import Any

from sqlalchemy import (
    ColumnElement, Connection, Select, String, and_, exists, false, func, intersect, or_, select, true,
)

from ..errors import PacsError
from ..index.models import PatientIdentifier, PatientNameWord
from ..names import fold, fold_name
from .attributes import Attribute, Kind, patients, series, studies

identifiers = PatientIdentifier.__table__
name_words_t = PatientNameWord.__table__


class QueryError(PacsError):
    """An identifier or query parameter that cannot be matched (0xA900 / 400)."""


# Control characters no DICOM value holds (PS3.5 6.1.2.3 allows ESC, LF, FF,
# CR and TAB in some VRs): NUL in a matching value made PostgreSQL refuse the
# query (QIDO-RS: a 500; the worklist: C000 with the driver's text), the
# others can match nothing.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


def check_characters(keyword: str, value: str) -> None:
    """Raise :class:`QueryError` (0xA900 / 400) for a key whose value holds a
    control character no DICOM value may contain: the one check of Q/R
    C-FIND, QIDO-RS and the worklist, before any SQL."""
    if isinstance(value, str) and (bad := _CONTROL.search(value)):
        raise QueryError(f"{keyword} holds the control character U+{ord(bad.group()):04X}, "
                         "which no DICOM value may contain")


def universal(value: str) -> bool:
    """Whether a key's value is universal matching: empty, or made of "*"
    only (PS3.4 C.2.2.2.4: "*" alone matches every value, as zero length
    does), whatever the key's VR and level."""
    return value.strip().strip("*") == ""


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def like_literal(text: str) -> str:
    """*text* as literal characters of a LIKE pattern (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def like_pattern(value: str) -> str:
    """DICOM wildcards to a LIKE pattern (escape character ``\\``)."""
    return like_literal(value).replace("*", "%").replace("?", "_")


def text_match(column: Any, value: str) -> ColumnElement[bool]:
    if has_wildcard(value):
        if value.strip("*") == "":
            return true()
        return column.like(like_pattern(value), escape="\\")
    return column == value


def list_match(column: Any, value: str) -> ColumnElement[bool]:
    parts = value.split("\\")
    if len(parts) > 1:
        return or_(*(text_match(column, p) for p in parts))
    return text_match(column, value)


def _not_empty(column: Any) -> ColumnElement[bool]:
    # A zero-length value is unknown, and an unknown value fails every
    # non-universal match (dcmqrscp; PS3.4 K.2.2.1.1.1 for the worklist):
    # without this "-20240101" matched "" (it sorts first) while
    # "20240101" and "20240101-" never did.
    return and_(column.is_not(None), column != "")


def time_key(column: Any) -> Any:
    """A TM column as 12 digits, HHMMSS then the fraction to 6 digits.

    TM values may stop after the hour or minute ("10", "1015") and carry
    0-6 fraction digits; as text "1015" < "101500" and a range bound had to
    be padded with "~", whose order depends on the database collation (an
    ICU vi-VN one put "16~" before "160000.5"). Fixed-length digit strings
    compare alike under every collation and on SQLite and PostgreSQL, and
    need no new column: ``substr(t || '000000', 1, 6)`` pads the
    HHMMSS part, ``substr(substr(t, 8) || '000000', 1, 6)`` the fraction.
    """
    hhmmss = func.substr(column + "000000", 1, 6, type_=String)
    fraction = func.substr(func.substr(column, 8, type_=String) + "000000", 1, 6, type_=String)
    return hhmmss + fraction


def time_bound(value: str, *, high: bool) -> str:
    """A query TM value as :func:`time_key` digits; a high bound (or the top
    of a single value) takes the whole precision given: "1200" reaches
    12:00:59.999999."""
    hhmmss, _, fraction = value.partition(".")
    pad = "9" if high else "0"
    if fraction or len(hhmmss) == 6 or not high:
        digits = hhmmss.ljust(6, "0") + fraction.ljust(6, pad)
    else:
        digits = hhmmss.ljust(12, pad)
    return digits


def range_match(column: Any, value: str, *, is_time: bool = False) -> ColumnElement[bool]:
    """Single value or range matching of a DA or TM column (PS3.4 C.2.2.2.5).

    Times compare as times of day (see :func:`time_key`): "0830" and
    "083000" are the same time, a value of lower precision ("1015") stands
    for the whole minute. Empty values never match.
    """
    value = value.strip()
    if has_wildcard(value):
        # Wildcards are not DA/TM matching (C.2.2.2.4); only "*" gets here
        # (check_range), and it is universal matching.
        if value.strip("*") == "":
            return true()
        return and_(_not_empty(column), text_match(column, value))
    subject = time_key(column) if is_time else column
    conditions = [_not_empty(column)]
    if "-" in value:
        low, high = (v.strip() for v in value.split("-", 1))
        if not low and not high:
            return true()
    else:
        low = high = value
    if low:
        conditions.append(subject >= (time_bound(low, high=False) if is_time else low))
    if high:
        conditions.append(subject <= (time_bound(high, high=True) if is_time else high))
    return and_(*conditions)


# The DA/TM pairs a QIDO-RS search matches as one date-time (PS3.18 8.3.4.1.1).
DATE_TIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime"))


def _range_bounds(value: str) -> tuple[str, str] | None:
    """(low, high) of a DA/TM range value, "" for an open end; None for a
    single value or universal matching."""
    value = value.strip()
    if "-" not in value or has_wildcard(value):
        return None
    low, high = (v.strip() for v in value.split("-", 1))
    return (low, high) if low or high else None


def combined_pairs(match: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (date, time) keys of *match* to be matched as one date-time range:
    both ranges of the same form (PS3.4 C.2.2.2.5.4: "<date1>-<date2>" with
    "<time1>-<time2>", "-<date>" with "-<time>", "<date>-" with "<time>-")."""
    pairs = []
    for date_key, tm_key in DATE_TIME_PAIRS:
        dates, times = _range_bounds(match.get(date_key) or ""), _range_bounds(match.get(tm_key) or "")
        if dates and times and (bool(dates[0]), bool(dates[1])) == (bool(times[0]), bool(times[1])):
            pairs.append((date_key, tm_key))
    return pairs


def datetime_range_match(date_column: Any, time_column: Any, dates: str, times: str) -> ColumnElement[bool]:
    """Combined date-time range matching (PS3.4 C.2.2.2.5.4): the range
    values of a DA and a TM key, concatenated, as one DT range. StudyDate
    "20250101-20250102" with StudyTime "1800-0800" is the night from 18:00
    to 08:00 (matched apart, the times cross midnight and match nothing),
    "20250101-20250103" with "1000-1800" takes in the 2nd at 20:00.

    A day strictly inside the range matches whatever its time; on a bound's
    own day the time decides, and an empty time is unknown, no match (as a
    range never matches an empty value, see :func:`_not_empty`)."""
    date_low, date_high = _range_bounds(dates) or ("", "")
    time_low, time_high = _range_bounds(times) or ("", "")
    timed = _not_empty(time_column)
    conditions = [_not_empty(date_column)]
    # The plain date bounds too: implied by the ORs, they let the date index take the range.
    if date_low:
        conditions += [date_column >= date_low, or_(date_column > date_low, and_(
            date_column == date_low, timed, time_key(time_column) >= time_bound(time_low, high=False)))]
    if date_high:
        conditions += [date_column <= date_high, or_(date_column < date_high, and_(
            date_column == date_high, timed, time_key(time_column) <= time_bound(time_high, high=True)))]
    return and_(*conditions)


def _one_group(column: Any, value: str, index_column: Any, whole: ColumnElement[bool]) -> ColumnElement[bool]:
    """*value* (folded, without "=") matches one component group of the
    stored name in *column* (groups joined by "="), or *whole* holds.

    Latin text matches the alphabetic group, the first: equality or a LIKE
    on the start of the name, narrowed by a prefix LIKE on *index_column*
    (whose value starts like *column*'s) so its index is used. Text in
    another script (the folded form is not ASCII: kanji, kana, hangul) may
    be the ideographic or phonetic group too, which needs a scan."""
    pattern = like_pattern(value)
    if has_wildcard(value):
        conditions = [column.like(pattern, escape="\\")]
        if not pattern.endswith("%"):
            conditions.append(column.like(pattern + "=%", escape="\\"))
    else:
        conditions = [column == value, column.like(pattern + "=%", escape="\\")]
    if not value.isascii():
        conditions += [column.like("%=" + pattern, escape="\\"), column.like("%=" + pattern + "=%", escape="\\")]
        return or_(whole, *conditions)
    prefix = re.split(r"[*?]", value, maxsplit=1)[0]
    if not prefix:
        return or_(whole, *conditions)
    return and_(index_column.like(like_pattern(prefix) + "%", escape="\\"), or_(whole, *conditions))


# An any-word name search takes its candidates from the name word index when
# they are few: walking the study dates meets a page of the newest studies
# of a common name sooner than so many patients' studies can be gathered and
# sorted (at 100,000 studies on SQLite, "NGUYEN" -- 4 in 10 names -- took 65
# ms by its candidates, 13 ms by the dates; "ZZZ" 1.2 ms by its candidates,
# 146 ms by the dates, every study read). PostgreSQL gathers a row slower.
# A word is looked up if its range holds at most SELECTIVE_WORD_ROWS rows;
# the patients having every such word of the term are the candidates if at
# most SELECTIVE_PATIENTS of the database's kind.
SELECTIVE_WORD_ROWS = 5000
SELECTIVE_PATIENTS = {"sqlite": 5000, "postgresql": 1000}
# The distinct words of a term looked up, at most (a name has a few; the
# LIKEs decide on the others): a query per word, and SQLite refuses an
# INTERSECT of more than 500 SELECTs (a pasted 600-word term was a 500).
LOOKUP_WORDS = 8

NameLookup = Callable[[str], "ColumnElement[bool] | None"]


def name_word_lookup(conn: Connection) -> NameLookup:
    """The candidates of an any-word name search, on *conn*: for a folded
    term ("NGUYEN VAN AN": whole words, the last one a prefix, as an
    any-word LIKE reads it), the patients having each of its selective
    words (table patient_name_words, :mod:`pacs.index.name_words`: an index
    range each), as a list of keys; None when no word of it is selective or
    they leave too many patients (see :data:`SELECTIVE_PATIENTS`: the LIKEs
    alone, on the rows the query's order walks, then find a page sooner).
    The candidates are a superset: the LIKEs stay the exact filter.

    On PostgreSQL the keys themselves, not a subquery: its planner read
    every patient through the LIKEs and joined the subquery's rows after
    (12 ms of 14 for "NGUYEN VAN AN" at 100,000 studies)."""
    most = SELECTIVE_PATIENTS.get(conn.dialect.name, min(SELECTIVE_PATIENTS.values()))
    counted: dict[tuple[str, bool], int] = {}

    def having(word: str, prefix: bool) -> Select[Any]:
        condition = (name_words_t.c.word.like(like_literal(word) + "%", escape="\\") if prefix
                     else name_words_t.c.word == word)
        return select(name_words_t.c.patient_pk).where(condition)

    def rows(word: str, prefix: bool) -> int:
        if (word, prefix) not in counted:
            bounded = having(word, prefix).limit(SELECTIVE_WORD_ROWS + 1).subquery()
            counted[(word, prefix)] = int(conn.execute(select(func.count()).select_from(bounded)).scalar_one())
        return counted[(word, prefix)]

    def lookup(folded: str) -> ColumnElement[bool] | None:
        words = [w for w in re.split(r"[ ^=]+", folded) if w]
        # Whole words but the last, a prefix; fewer words leave more candidates, never fewer.
        looked_up = list(dict.fromkeys((w, i == len(words) - 1) for i, w in enumerate(words)))[:LOOKUP_WORDS]
        selective = [(w, prefix) for w, prefix in looked_up if rows(w, prefix) <= SELECTIVE_WORD_ROWS]
        if not selective:
            return None
        both = having(*selective[0]) if len(selective) == 1 else intersect(*(having(*s) for s in selective))
        if conn.dialect.name == "postgresql":
            pks = list(conn.execute(select(both.subquery().c[0]).limit(most + 1)).scalars())
            if len(pks) > most:
                return None
            return patients.c.pk.in_(sorted(pks)) if pks else false()
        # SQLite's planner takes the subquery as it is (and binds no list).
        # One word: its rows are counted already.
        found = rows(*selective[0]) if len(selective) == 1 else conn.execute(select(func.count()).select_from(
            select(both.subquery().c[0]).limit(most + 1).subquery())).scalar_one()
        if found > most:
            return None
        return patients.c.pk.in_(both) if found else false()

    return lookup


def pn_match(value: str, folded_column: Any, words_column: Any = None, reading_column: Any = None, *,
             fuzzy: bool = False,
             word_lookup: NameLookup | None = None) -> ColumnElement[bool]:
    """Person-name matching on the folded column (or its word forms, when the
    query has no component separators and word columns exist).

    A value without separators is words as people type them: in the order
    of the components ("TRINH BINH VAN", *words_column*) or as the name is
    read, family middle given ("Trịnh Văn Bình" for "Trịnh^Bình^Văn",
    *reading_column*, see :func:`pacs.names.name_reading`).

    A stored name may carry ideographic and phonetic groups after its
    alphabetic one ("Trần^Thị Bích=ちば^ていこ"). A query value without "="
    is one group (PS3.4 C.2.2.2.1): it matches the alphabetic group, and a
    value in another script than Latin also the ideographic or phonetic
    group (see :func:`_one_group`). A value with "=" is compared with the
    name whole.

    *word_lookup* (fuzzy matching): the candidates of a term
    (:func:`name_word_lookup` for the patient's name), which narrow the
    any-word LIKEs through an index when the term is selective."""
    words = words_column is not None and "^" not in value and "=" not in value
    folded = " ".join(fold(value).split()) if words else fold_name(value)
    column = words_column if words else folded_column
    if not folded or folded.strip("*") == "":
        return true()
    # The reading order differs from the word order in the order of its (3 or
    # more) words only: one word without wildcards matches both or neither.
    reading = reading_column if words and (" " in folded or has_wildcard(folded)) else None
    if fuzzy and not has_wildcard(folded):
        # QIDO-RS fuzzymatching: any word of the name starts with the term.
        pattern = like_pattern(folded)
        columns = [column] if reading is None else [column, reading]
        any_word = or_(*(c.like(p, escape="\\") for c in columns for p in (pattern + "%", "% " + pattern + "%")))
        # Each LIKE matches where a word of the name starts with the term's
        # first word: the rows having such a word are the candidates (an
        # index range), the LIKEs decide among them, as they did alone.
        candidates = word_lookup(folded) if word_lookup is not None else None
        return any_word if candidates is None else and_(candidates, any_word)
    whole = text_match(column, folded)
    if "=" in folded:
        return whole
    # One group of the name: in word form, the folded name with its
    # component separators read as spaces (the word column runs the groups together).
    grouped = func.replace(folded_column, "^", " ", type_=String) if words else folded_column
    matched = _one_group(grouped, folded, column, whole)
    # The reading column holds the alphabetic group alone (indexed: prefix LIKE or equality).
    return matched if reading is None else or_(matched, text_match(reading, folded))


def qualifying_issuer(match: Mapping[str, str]) -> str:
    """The Issuer of Patient ID that qualifies the Patient ID of *match*
    (both given, neither universal), else "": then the issuer, alone, is a
    condition on the patient's own issuer as any other text key."""
    value, issuer = match.get("PatientID") or "", match.get("IssuerOfPatientID") or ""
    return issuer if value.strip("*") and issuer.strip("*") else ""


def patient_id_match(value: str, *, issuer: str = "", other_ids: bool = True) -> ColumnElement[bool]:
    """The patients *value* identifies: their own Patient ID, or (with
    *other_ids*) one of their other IDs. With *issuer* the ID and its issuer
    are one identifier (PS3.3 Patient Identification: the issuer qualifies
    the ID it comes with): the own ID under the own issuer, or an other ID
    under that ID's issuer, never an ID of one and the issuer of another."""
    # Citizen-ID and insurance numbers are first-class identifiers: a match on
    # any of a patient's other IDs is a match on the patient. A UNION of two
    # index lookups, not an OR across tables (which would scan patients).
    if not other_ids:
        # A retrieve: Patient ID is a unique key there, single value
        # matching only (PS3.4 C.4.2.1.4.1). "VN*" sent three patients and
        # "*" the whole archive.
        if has_wildcard(value) or "\\" in value:
            raise QueryError("PatientID in a retrieve must be a single value, without wildcards")
        own = patients.c.patient_id == value
        return and_(own, list_match(patients.c.issuer, issuer)) if issuer else own
    by_id = select(patients.c.pk).where(list_match(patients.c.patient_id, value))
    by_other = select(identifiers.c.patient_pk).where(list_match(identifiers.c.value, value))
    if issuer:
        # An ID stored without issuer (a modality that sent none) is not
        # taken for the ID under the issuer asked for: under another issuer
        # the same number may be another person's, and a query naming its
        # issuer must never answer a stranger. Such IDs are found without
        # an issuer in the query.
        by_id = by_id.where(list_match(patients.c.issuer, issuer))
        by_other = by_other.where(list_match(identifiers.c.issuer, issuer))
    return patients.c.pk.in_(by_id.union(by_other))


# An alias, not `series` itself: at SERIES/IMAGE level the outer query
# already selects from `series`, and auto-correlation then left the
# ModalitiesInStudy subquery with no FROM at all ("returned no FROM clauses",
# a 500 on /dicom-web/studies/{study}/series?ModalitiesInStudy=CT; found by
# the fuzz run, bench/fuzz.py; replayed in tests/test_fuzz.py). Made once:
# an alias builds a proxy of every column of the table on first use, ~0.5 ms
# that each query paid twice (validation and the SELECT).
_MODALITY_SERIES = series.alias("modality_series")


def _modalities(value: str) -> ColumnElement[bool]:
    wanted = [v.strip() for v in value.split("\\") if v.strip()]
    if not wanted:
        return true()
    # Any series of the study counts (see _MODALITY_SERIES).
    other = _MODALITY_SERIES
    return exists(
        select(other.c.pk).where(
            other.c.study_pk == studies.c.pk, or_(*(text_match(other.c.modality, m) for m in wanted))
        )
    )


# DA: YYYYMMDD; TM: HH[MM[SS[.F{1,6}]]] with the ranges of PS3.5 table 6.2-1
# (SS up to 60: a leap second). "20261305", "25" and "2400" are no values.
_DATE = re.compile(r"\d{4}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])")
_TIME = re.compile(r"([01]\d|2[0-3])([0-5]\d(([0-5]\d|60)(\.\d{1,6})?)?)?")


def is_date(value: str) -> bool:
    """Whether *value* is one DICOM DA value, a day of the calendar."""
    if not _DATE.fullmatch(value):
        return False
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:  # 20260231, or year 0000
        return False
    return True


def is_time(value: str) -> bool:
    """Whether *value* is one DICOM TM value (HH, HHMM, HHMMSS[.FFFFFF])."""
    return _TIME.fullmatch(value) is not None


def check_range(keyword: str, value: str, kind: Kind) -> None:
    """Reject what is neither a DA/TM value nor a range of them (PS3.4 C.2.2.2.5).

    Shared by C-FIND, QIDO-RS and the worklist. The value is left out of
    the message: it reaches the log, and a mistyped key can hold anything,
    a patient's ID included.
    """
    value = value.strip()
    if value.strip("*") == "":
        return
    valid, form = (is_date, "YYYYMMDD") if kind is Kind.DATE else (is_time, "HHMMSS[.FFFFFF]")
    bounds = [b.strip() for b in value.split("-", 1)] if "-" in value else [value]
    if not any(bounds) or not all(valid(b) for b in bounds if b):
        raise QueryError(f"{keyword} must be {form} or a range {form}-{form}")


# Person-name keys: their folded, word-order and reading-order columns (see pn_match).
_PN_COLUMNS = {
    "PatientName": (patients.c.name_folded, patients.c.name_words, patients.c.name_reading),
    "ReferringPhysicianName": (studies.c.referring_physician_folded, studies.c.referring_physician_words,
                               studies.c.referring_physician_reading),
}


def condition(attribute: Attribute, value: str, *, fuzzy: bool = False, other_ids: bool = True,
              issuer: str = "", word_lookup: NameLookup | None = None) -> ColumnElement[bool]:
    """The SQL condition for one matching key with a non-empty value
    (*issuer*: the :func:`qualifying_issuer` of a Patient ID; *word_lookup*:
    :func:`name_word_lookup` of the connection, for a fuzzy Patient's Name)."""
    kind = attribute.kind
    if kind is Kind.PN:
        lookup = word_lookup if attribute.keyword == "PatientName" else None
        return pn_match(value, *_PN_COLUMNS[attribute.keyword], fuzzy=fuzzy, word_lookup=lookup)
    if kind is Kind.PATIENT_ID:
        return patient_id_match(value, issuer=issuer, other_ids=other_ids)
    if kind is Kind.MODALITIES:
        return _modalities(value)
    if kind is Kind.UID:
        if value.strip() == "*":
            # Universal matching, as an empty value (some viewers send it):
            # C-MOVE and C-GET read it so too (dicom_scp.qr.retrieve_keys).
            return true()
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if not uids:
            # Backslashes alone: a list of no UID (was an IndexError, 0xC000).
            raise QueryError(f"{attribute.keyword} lists no UID")
        if any(has_wildcard(u) for u in uids):
            raise QueryError(f"wildcards are not allowed in {attribute.keyword}")
        return attribute.column.in_(uids) if len(uids) > 1 else attribute.column == uids[0]
    if kind in (Kind.DATE, Kind.TIME):
        check_range(attribute.keyword, value, kind)
        return range_match(attribute.column, value, is_time=kind is Kind.TIME)
    if kind is Kind.INT:
        try:
            numbers = [int(v) for v in value.split("\\")]
        except ValueError:
            raise QueryError(f"{attribute.keyword} must be an integer, not {value!r}") from None
        # The columns are 32-bit; binding a larger number raised OverflowError (a 500).
        if any(not -(2**31) <= n < 2**31 for n in numbers):
            raise QueryError(f"{attribute.keyword} must be a 32-bit integer")
        return attribute.column.in_(numbers) if len(numbers) > 1 else attribute.column == numbers[0]
    if kind is Kind.COMPUTED:
        # Callers leave these out (engine.matching_keys): an optional key we
        # do not match on is ignored for matching (PS3.4 C.2.2.1.3).
        raise QueryError(f"{attribute.keyword} is a return key and cannot be matched")
    return list_match(attribute.column, value)


__all__ = [
    "QueryError",
    "DATE_TIME_PAIRS",
    "check_range",
    "combined_pairs",
    "condition",
    "datetime_range_match",
    "is_date",
    "is_time",
    "like_literal",
    "like_pattern",
    "list_match",
    "patient_id_match",
    "name_word_lookup",
    "pn_match",
    "qualifying_issuer",
    "range_match",
    "text_match",
    "time_bound",
    "time_key",
    "universal",
]
