"""Search forms of person names and other text.

Vietnamese names carry diacritics ("Nguyễn Văn An") that modality keyboards,
HIS exports and radiologists typing a search often drop ("NGUYEN VAN AN").
Matching is done on a folded form: Unicode NFD, combining marks removed,
``đ/Đ`` mapped to ``D`` (it is a distinct letter, not a base plus a mark, so
NFD leaves it alone), upper case. The DICOM ``^`` and ``=`` separators are
kept so component-wise matching still works.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

# Letters NFD does not decompose but users type without their stroke.
_EXTRA = str.maketrans({"đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L"})


@lru_cache(maxsize=4096)
def fold(text: str | None) -> str:
    """Fold *text* for matching: no diacritics, upper case, spaces collapsed.

    Cached: every object of a study folds the same names (~2% of a small
    object's Python time).
    """
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFD", text.translate(_EXTRA))
    kept: list[str] = []
    base = ""
    for c in decomposed:
        if unicodedata.combining(c):
            # Only Latin letters lose their marks: Japanese kana keep their
            # voicing marks (だ is not た), Vietnamese tones and hats go.
            if base < "\u0250":
                continue
        else:
            base = c
        kept.append(c)
    folded = unicodedata.normalize("NFC", "".join(kept))
    return " ".join(folded.upper().split())


@lru_cache(maxsize=4096)
def ascii_text(text: str, person_name: bool = False) -> str:
    """*text* in the default repertoire (ASCII), for a peer that reads no
    other (``pacs ae add --charset ascii``: a modality that shows UTF-8 as
    "NguyÃ¡Â»â€¦n"): letters without their marks, case kept ("Nguyễn^Văn Đức"
    is "Nguyen^Van Duc", as Vietnamese write a name without diacritics); a
    person name keeps its alphabetic group only (the others are in other
    scripts); any other character is "?"."""
    if person_name:
        text = text.split("=")[0]
    decomposed = unicodedata.normalize("NFD", text.translate(_EXTRA))
    return "".join(c if c.isascii() else "?" for c in decomposed if not unicodedata.combining(c))


def fold_name(name: object) -> str:
    """Folded form of a DICOM person name (PN value, any representation)."""
    if name is None:
        return ""
    text = str(name)
    # Trailing empty components ("NGUYEN^VAN^^^") carry no meaning in PN.
    groups = [g.rstrip("^").strip() for g in text.split("=")]
    return fold("=".join(groups).rstrip("="))


def same_person(a: object, b: object) -> bool:
    """Whether two person names are written the same, diacritics included:
    "Hoàng^Minh Tuân" and "Hoàng^Minh Tuấn" are two people, whom the folded
    form (for searching) confuses. Case, Unicode normalisation, spacing and
    trailing empty components do not count. For access rules, not search."""
    key = _person_key(a)
    return bool(key) and key == _person_key(b)


def _person_key(name: object) -> str:
    # The alphabetic group: "Nguyễn^Văn An=グエン" is "Nguyễn^Văn An" written twice more.
    if name is None:
        return ""
    alphabetic = unicodedata.normalize("NFC", str(name)).split("=")[0]
    return " ".join(alphabetic.rstrip("^").split()).casefold()


def name_words(name: object) -> str:
    """Folded name with component separators read as spaces, for word search."""
    return " ".join(fold_name(name).replace("^", " ").replace("=", " ").split())


def name_reading(name: object) -> str:
    """Words of the name's alphabetic group in the order they are read and
    typed where the family name comes first and the middle name before the
    given name (Vietnamese, Chinese, Korean): "Trịnh^Bình^Văn"
    (Family^Given^Middle, as DICOM and HL7 order the components) is "Trịnh
    Văn Bình", searched as "TRINH VAN BINH". Without a middle name the
    components' own order, as :func:`name_words` (kept filled, not empty:
    an index column of one dominant value misleads query planners)."""
    components = fold_name(name).split("=")[0].split("^")
    if len(components) >= 3:
        components = [components[0], components[2], components[1], *components[3:]]
    return " ".join(" ".join(components).split())
