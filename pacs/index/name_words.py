"""The words of the patients' names (table patient_name_words), kept with the name.

A name is searched by any of its words: people are called by the given
name, the last word ("Nguyễn Văn An" is "An"), and the study list, QIDO-RS
fuzzymatching and FHIR Patient ``name=`` find a patient by the start of any
word. On the name columns that is a LIKE '% AN%', which no index serves:
every search read every patient. Here each distinct word of the name is a
row, and a word's start is a prefix range on the word index
(:func:`pacs.query.matching.name_word_lookup`).

Every writer of a patient's name calls :func:`set_name_words` in the
transaction that writes it; a deleted patient's words go with it (ON DELETE
CASCADE; SQLite runs with foreign keys on, pacs.index.db).
"""

from __future__ import annotations

from sqlalchemy import Connection, Table, delete

from .models import PatientNameWord
from .writer_helpers import insert_ignore_rows

name_words_t: Table = PatientNameWord.__table__  # type: ignore[assignment]


def words_of(name_words: str) -> list[str]:
    """The distinct words of a patient's word form (``patients.name_words``,
    :func:`pacs.names.name_words`: folded, separators read as spaces), in
    order. Its reading form (``name_reading``) has the same words."""
    return list(dict.fromkeys(name_words.split()))


def set_name_words(conn: Connection, patient_pk: int, name_words: str) -> None:
    """Make the word rows of patient *patient_pk* the words of *name_words*
    (the patient's ``name_words`` value as just written), in *conn*'s
    transaction: words no longer in the name go, new ones come. Called by
    every writer of a patient's name (new patient, first name, HIS update)."""
    wanted = words_of(name_words)
    conn.execute(delete(name_words_t).where(name_words_t.c.patient_pk == patient_pk,
                                            name_words_t.c.word.not_in(wanted)))
    if wanted:
        # ON CONFLICT: a word the patient has already (or another writer of the same name just added).
        insert_ignore_rows(conn, name_words_t, [{"patient_pk": patient_pk, "word": w} for w in wanted],
                           ["patient_pk", "word"])


__all__ = ["name_words_t", "set_name_words", "words_of"]
