"""De-identification: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile (Table E.1-1 as of 2024b).

What :func:`deidentify` does to a dataset (in place):

- applies the "Basic Prof." column of Table E.1-1 (encoded below as data,
  :data:`BASIC_PROFILE`) to every attribute, at every depth of nested sequences;
- removes every private attribute (the Retain Safe Private Option is not
  implemented), curves (50xx), overlay planes (60xx: Overlay Data is X, and a
  plane left without its data would be invalid), group lengths, and public
  attributes unknown to pydicom's dictionary (nobody can vouch for them);
- replaces UIDs with :class:`UidMap`: ``2.25.<uuid5 keyed by a secret salt>``, so
  one original UID becomes the same new UID in every instance, every sequence
  and every run with the same salt. Every UI value is remapped (Study/Series/
  SOP Instance, Frame of Reference, Acquisition, Pyramid UIDs...) except
  well-known UIDs (pydicom's UID dictionary: classes, transfer syntaxes,
  DICOM's coding schemes), the attributes naming a class or a transfer syntax
  (a vendor's private SOP Class UID stays: it says what the object is) and the
  Coding Scheme UID of a public scheme (:data:`STANDARD_CODING_SCHEMES`);
- replaces Patient's Name and Patient ID with a pseudonym derived from the salt,
  the original Patient ID and its Issuer of Patient ID (same patient at the
  same issuer, same pseudonym; the same local ID at two issuers, two
  pseudonyms). Patients without an issuer keep the pseudonym earlier versions
  gave them; patients with one get a different pseudonym than in exports made
  before the issuer was taken into account;
- replaces Encapsulated Document (D) by a blank document of the same MIME type
  (an empty one-page PDF, an empty CDA, an empty STL...): a PDF cannot be
  cleaned reliably, so not one byte of the original goes out. Document Title is
  emptied, Encapsulated Document Length follows, Burned In Annotation of a
  document (it speaks of the document's content) becomes NO, and De-identification
  Method gets a second value saying the document was replaced;
- writes a zero File Preamble: the original's 128 bytes are free for any
  use (a TIFF header, a vendor's label with the patient's name) and went out
  unchanged in every file written from the dataset;
- sets Patient Identity Removed = YES (NO when Burned In Annotation = YES: the
  pixels still identify the patient), De-identification Method, its Code
  Sequence (DCM 113100 "Basic Application Confidentiality Profile") and
  Longitudinal Temporal Information Modified = REMOVED.

Compound actions are resolved without knowing the IOD, always keeping the
object conformant: for plain attributes the last alternative wins (X/Z -> Z,
X/D, Z/D, X/Z/D -> D: an empty or dummy value is legal where removal might
not be; D on a UI value remaps it, a dummy string is no UID); for sequences
X and X/D -> removed (those sequences are Type 3 in the image IODs), Z, X/Z
and X/Z/D -> an empty sequence (Referenced Performed Procedure Step Sequence
is Type 2 in SR and KOS: removed, the object failed IOD validation), D, Z/D,
C and X/Z/U* -> a skeleton of the original items cleaned *strictly*
(Content Sequence and Graphic Annotation Sequence are Type 1: emptying them
would break the object). Dates: Z dates become empty, D dates the dummy
19000101 / 000000.

Strict cleaning (inside a sequence the table replaces, a sequence whose
keyword says "Identification", and everything nested in them) keeps only
structure: code strings (CS: Value Type, Relationship Type, Graphic Layer...),
numbers and coordinates, remapped UIDs and codes of public coding schemes
(:data:`STANDARD_CODING_SCHEMES`: DCM 121071 "Finding" is vocabulary). Every
other value (PN, LO, SH, AE, AS, LT, ST, UT, UC, UR, OB, OW, UN, dates) gets a
dummy, whatever the attribute, so e.g. Unformatted Text Value in a GSPS text
object or a licence number in Person Identification Code Sequence never
survives; attributes the table lists keep their own action (X still removes).

Beyond the table (stricter), everywhere:

- every date and time the table does not list gets a dummy value;
- every PN, LT, ST, UT, UC and UR value the table does not list gets a dummy
  (names and free text wherever they hide: sequences outside the table such
  as Requesting Physician Identification Sequence, Text Value of SR content
  items, Unformatted Text Value...);
- codes of a local coding scheme (anything not in
  :data:`STANDARD_CODING_SCHEMES`, e.g. "L" or "99..."): Code Value, Code
  Meaning, Long and URN Code Value get dummies (a department's or a
  physician's name is typical there), and a private scheme's designator
  ("99CHORAY": the hospital's name) becomes "99ANONYMIZED" ("L" stays);
- Patient's Birth/Death Date in Alternative Calendar and Patient's Alternative
  Calendar are removed (a lunar birth date undoes the removal of the birth
  date); Document Title and Content Description are emptied, Content Label
  gets a dummy (see :data:`EXTRA`).

Pixel data is never touched. Burned-in annotation (text inside the pixels,
Burned In Annotation = YES, typical of ultrasound and secondary captures) is
not removed: :func:`may_release` tells callers (export, routing) whether a
de-identified copy may leave, see there.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pydicom.datadict import dictionary_VR, get_entry, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

log = logging.getLogger(__name__)

METHOD = "filmless-pacs PS3.15 E Basic Profile"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")


class Action(str, Enum):
    """Table E.1-1 action codes (the compound ones are resolved per element)."""

    X = "X"  # remove
    Z = "Z"  # zero length (or dummy)
    D = "D"  # dummy value consistent with the VR
    U = "U"  # UID replaced, consistent within the set of instances
    K = "K"  # keep (sequences are cleaned)
    C = "C"  # clean: similar meaning without identifying information
    XZ = "X/Z"
    XD = "X/D"
    ZD = "Z/D"
    XZD = "X/Z/D"
    XZU = "X/Z/U*"


# PS3.15 Table E.1-1, "Basic Prof." column, for the attributes of the table
# with a fixed tag (curves, overlays and private attributes are handled by
# group above). One "GGGGEEEE ACTION" per entry.
_TABLE = """
00001000 X      00001001 U      00020003 U      00041511 U      00080014 U
00080015 X      00080018 U      00080020 Z      00080021 X/D    00080022 X/Z
00080023 Z/D    00080024 X      00080025 X      0008002A X/Z/D  00080030 Z
00080031 X/D    00080032 X/Z    00080033 Z/D    00080034 X      00080035 X
00080050 Z      00080058 U      00080080 X/Z/D  00080081 X      00080082 X/Z/D
00080090 Z      00080092 X      00080094 X      00080096 X      0008009C Z
0008009D X      00080201 X      00081010 X/Z/D  00081030 X      0008103E X
00081040 X      00081041 X      00081048 X      00081049 X      00081050 X
00081052 X      00081060 X      00081062 X      00081070 X/Z/D  00081072 X/D
00081080 X      00081084 X      00081110 X/Z    00081111 X/Z/D  00081120 X
00081140 X/Z/U* 00081155 U      00081195 U      00082111 X      00082112 X/Z/U*
00083010 U      00084000 X
00100010 Z      00100020 Z      00100021 X      00100030 Z      00100032 X
00100040 Z      00100050 X      00100101 X      00100102 X      00101000 X
00101001 X      00101002 X      00101005 X      00101010 X      00101020 X
00101030 X      00101040 X      00101050 X      00101060 X      00101080 X
00101081 X      00101090 X      00101100 X      00102000 X      00102110 X
00102150 X      00102152 X      00102154 X      00102155 X      00102160 X
00102180 X      001021A0 X      001021B0 X      001021C0 X      001021D0 X
001021F0 X      00102203 X/Z    00102297 X      00102299 X      00104000 X
00120010 D      00120020 D      00120021 Z      00120030 Z      00120031 Z
00120040 D      00120042 D      00120050 Z      00120051 X      00120060 Z
00120071 X      00120072 X      00120081 D      00120082 X
0016002B X      0016004B X      0016004D X      0016004E X      0016004F X
00160050 X      00160051 X
00180010 Z/D    00181000 X/Z/D  00181002 U      00181004 X      00181005 X
00181007 X      00181008 X      00181009 X      0018100A X      0018100B U
00181030 X/D    001811BB D      00181400 X/D    00182042 U      00184000 X
00185011 X      0018700A X/D    00189185 X      00189367 D      00189369 D
0018936A D      00189371 D      00189373 X      0018937B X      0018937F X
00189424 X      00189516 X/D    00189517 X/D    00189937 X      0018A003 X
0020000D U      0020000E U      00200010 Z      00200052 U      00200200 U
00203401 X      00203406 X      00204000 X      00209158 X      00209161 U
00209164 U
00281199 U      00281214 U      00284000 X
00321020 X      00321021 X      00321030 X      00321032 X      00321033 X
00321060 X/Z    00321066 X      00321067 X      00321070 X      00324000 X
00320012 X
00340001 D      00340002 D      00340005 D      00340007 D
00380004 X      00380010 X      00380011 X      00380014 X      0038001E X
00380020 X      00380021 X      00380040 X      00380050 X      00380060 X
00380061 X      00380062 X      00380064 X      00380300 X      00380400 X
00380500 X      00384000 X
003A0310 U      003A0314 D
00400001 X      00400002 X      00400003 X      00400004 X      00400005 X
00400006 X      00400007 X      00400009 X      0040000B X      00400010 X
00400011 X      00400012 X      00400241 X      00400242 X      00400243 X
00400244 X      00400245 X      00400250 X      00400251 X      00400253 X
00400254 X      00400275 X      00400280 X      00400310 X      00400512 D
00400513 Z      0040050A X      0040051A X      00400551 D      00400554 U
00400555 X/Z    00400562 Z      00400600 X      00400602 X      00400610 Z
004006FA X      00401001 X      00401002 X      00401004 X      00401005 X
0040100A X      00401010 X      00401011 X      00401101 D      00401102 X
00401103 X      00401104 X      00401400 X      00402001 X      00402008 X
00402009 X      00402010 X      00402011 X      00402016 Z      00402017 Z
00402400 X      00403001 X      00404005 X      00404008 X      00404010 X
00404011 X      00404023 U      00404025 X      00404027 X      00404028 X
00404030 X      00404034 X      00404035 X      00404036 X      00404037 X
00404050 X      00404051 X      00404052 X      0040A027 D      0040A073 D
0040A075 D      0040A078 X      0040A07A X      0040A07C X      0040A088 Z
0040A123 D      0040A124 U      0040A171 U      0040A172 U      0040A192 X
0040A193 X      0040A307 X      0040A352 X      0040A353 X      0040A354 X
0040A358 X      0040A402 U      0040A730 D      0040DB0C U      0040DB0D U
00500020 X      00500021 X      0050001B X
00620021 U
00700001 D      00700084 Z/D    00700086 X      0070031A U      00701101 U
00701102 U
00880140 U      00880200 X      00880904 X      00880906 X      00880910 X
00880912 X
04000100 U      04000402 X      04000403 X      04000404 X      04000550 X
04000551 X      04000552 X      04000561 X      04000600 X
20300020 X      22000002 X/Z    22000005 X/Z
30060002 D      30060004 X      30060006 X      30060008 Z      30060009 X/D
30060024 U      30060026 Z      30060028 X      30060038 X      30060085 X
30060088 X      300600A6 Z      300600C2 U
30080054 X/D    30080056 X/D    30080105 X/Z    30080250 X/D    30080251 X/D
300A0002 D      300A0003 X      300A0004 X      300A0006 X/D    300A0007 X/D
300A000E X      300A0013 U      300A0016 X      300A0072 X      300A0083 U
300A00B2 X      300A00C3 X      300A00DD X      300A0196 X      300A01A6 X
300A01B2 X      300A0216 X      300A02EB X      300A0608 D      300A0609 U
300A0611 Z      300A0615 Z      300A0619 D      300A0623 D      300A062A D
300A0650 U      300A0676 X      300A067C D      300A067D Z      300A0700 U
300A0734 D      300A0736 D      300A073A D      300A0741 D      300A0742 D
300A0760 D      300A0783 D
300C0113 X      300E0008 X/Z
30100006 U      3010000B U      3010000F Z      30100013 U      30100015 U
30100017 Z      3010001B Z      3010002D D      30100031 U      30100033 D
30100034 D      30100035 D      30100036 X      30100037 X      3010003B U
30100043 Z      3010004C X/D    3010004D X/D    30100054 D      30100056 X/D
3010005A Z      3010005C Z      30100061 X      3010006E U      3010006F U
30100077 D      3010007A Z      3010007B Z      3010007F Z      30100081 Z
40000010 X      40004000 X
40080042 X      40080102 X      4008010A X      4008010B X      4008010C X
40080111 X      40080114 X      40080115 X      40080118 X      40080119 X
4008011A X      40080202 X      40080300 X      40084000 X
FFFAFFFA X      FFFCFFFC X
"""

# Entries of the 2024b table that the encoding above lacked (found missing by
# an exploratory test: Station/Retrieve AE Title, the GPS group, Acquisition
# and Pyramid UIDs, Encapsulated Document...). Kept as a separate block so the
# first one still reads against its source; the two are merged below and an
# entry may not appear in both (checked at import).
_TABLE_2024B = """
00080012 X/D    00080013 X/Z/D  00080017 U      00080019 U      00080054 X
00080055 X      00080106 D      00080107 D      00081000 X      00081088 X
00120022 X      00120023 X      00120032 X      00120041 X      00120043 X
00120055 X      00120073 X      00120086 X      00120087 X
0014407C X      0014407E X
00160070 X      00160071 X      00160072 X      00160073 X      00160074 X
00160075 X      00160076 X      00160077 X      00160078 X      00160079 X
0016007A X      0016007B X      0016007C X      0016007D X      0016007E X
0016007F X      00160080 X      00160081 X      00160082 X      00160083 X
00160084 X      00160085 X      00160086 X      00160087 X      00160088 X
00160089 X      0016008A X      0016008B X      0016008C X      0016008D X
0016008E X
00180027 X      00180035 X      00181012 X      00181014 X      00181042 X
00181043 X      00181072 X      00181073 X      00181078 X      00181079 X
00181200 X      00181201 X      00181202 X      00181203 Z      00181204 X
00181205 X      0018700C X/D    0018700E X/D    00189074 D      00189151 D
00189623 D      00189701 D      00189804 D      00189919 Z/D    0018A002 X
00200027 X      00203403 X      00203405 X
00320032 X      00320033 X      00320034 X      00320035 X      00321000 X
00321001 X      00321010 X      00321011 X      00321040 X      00321041 X
00321050 X      00321051 X
0038001A X      0038001B X      0038001C X      0038001D X      00380030 X
00380032 X
003A0329 X      003A032B X
00402004 X      00402005 X      0040A023 X      0040A024 X      0040A030 D
0040A032 X/D    0040A033 X      0040A082 Z      0040A110 X      0040A112 X
0040A120 D      0040A121 D      0040A122 D      0040A13A D      0040DB06 X
0040DB07 X      0040E004 X
00420011 D
00440004 X      0044000B X      00440010 X      00440104 D      00440105 X
00640003 U
00686226 D      00686270 D
006A0003 D      006A0005 D      006A0006 X
00700082 X      00700083 X
0072000A D      0072005E D      0072005F D      00720061 D      00720063 D
00720065 D      00720066 D      00720068 D      0072006A D      0072006B D
0072006C D      0072006D D      0072006E D      00720070 D      00720071 D
00741234 X      00741236 X
01000420 X
04000105 D      04000115 D      04000310 X      04000562 D      04000563 D
04000564 Z      04000565 D
21000040 X      21000050 X      21000070 X      21000140 D
30020121 X      30020123 X
3006002D X      3006002E X      3006004D X      3006004E X
30080024 D      30080025 D      30080162 D      30080164 D      30080166 D
30080168 D
300A000B X      300A022C D      300A022E D      300A0785 U      300A078E X
300A0792 X      300A0794 X      300A079A X
300C0127 D
300E0004 Z      300E0005 Z
30100038 D      30100085 X
40080040 X      40080100 X      40080101 X      40080108 X      40080109 X
40080112 X      40080113 X      40080200 X
"""


def _parse_table(text: str) -> dict[int, Action]:
    tokens = text.split()
    return {int(tag, 16): Action(code) for tag, code in zip(tokens[::2], tokens[1::2], strict=True)}


def _merge(*tables: dict[int, Action]) -> dict[int, Action]:
    merged: dict[int, Action] = {}
    for table in tables:
        twice = merged.keys() & table.keys()
        if twice:
            raise ValueError(f"table entries listed twice: {sorted(f'{t:08X}' for t in twice)}")
        merged.update(table)
    return merged


BASIC_PROFILE: dict[int, Action] = _merge(_parse_table(_TABLE), _parse_table(_TABLE_2024B))

# Stricter than the table (see the module doc, "Beyond the table").
EXTRA: dict[int, Action] = {
    0x0040A160: Action.D,  # Text Value: free text of structured-report content items
    # Dates in other calendars undo the removal of Patient's Birth Date (a
    # Vietnamese lunar birth date is as identifying as the solar one).
    0x00100033: Action.X,  # Patient's Birth Date in Alternative Calendar
    0x00100034: Action.X,  # Patient's Death Date in Alternative Calendar
    0x00100035: Action.X,  # Patient's Alternative Calendar
    0x00420010: Action.Z,  # Document Title (Type 2): reports are titled with the patient's name
    0x00700080: Action.D,  # Content Label (CS, Type 1): operators type names into it
    0x00700081: Action.Z,  # Content Description (Type 2)
}
# Where the table's action would make the object non-conformant: Presentation
# Creation Date and Time (X in the table) are Type 1 in every presentation
# state IOD (PS3.3 C.11.10): removed, DCMTK refused the de-identified state
# on a patient's CD. A dummy date leaks nothing. Looked up before the table.
CONFORMANT: dict[int, Action] = {
    0x00700082: Action.D,  # Presentation Creation Date
    0x00700083: Action.D,  # Presentation Creation Time
}
_DATE_VRS = {"DA", "DT", "TM"}
# Values that are text someone typed (names, notes, addresses, URLs): replaced
# wherever they are, unless the table says otherwise.
_FREE_TEXT_VRS = {"PN", "LT", "ST", "UT", "UC", "UR"}
# Inside a sequence the table replaces (D, Z/D, C, X/Z/U*) short strings and
# raw bytes go too: only structure survives (see _Cleaner).
_STRICT_VRS = _FREE_TEXT_VRS | {"LO", "SH", "AE", "AS", "OB", "OW", "UN"}

_CODE_VALUE, _CODING_SCHEME, _CODE_MEANING = 0x00080100, 0x00080102, 0x00080104
_CODE_TEXT = {_CODE_VALUE, _CODE_MEANING, 0x00080119, 0x00080120}  # + Long and URN Code Value
# Code attributes that only name a vocabulary (Coding Scheme Designator and
# Version, Context Identifier, Mapping Resource): never identifying.
_CODE_VOCABULARY = {_CODING_SCHEME, 0x00080103, 0x0008010F, 0x00080105}
# Coding Scheme UID: the OID of a public terminology (SNOMED CT
# 2.16.840.1.113883.6.96, LOINC, UCUM...) is vocabulary like its designator;
# a local scheme's UID (under the hospital's root) is remapped like any UID.
_CODING_SCHEME_UID = 0x0008010C
# Public coding schemes: their codes are vocabulary (DCM 121071 "Finding"), not
# data about a person. Any other scheme ("L", "99LOCAL"...) is local and its
# codes can be a licence number and a physician's or a department's name.
STANDARD_CODING_SCHEMES = frozenset({
    "DCM", "SCT", "SRT", "SNM3", "LN", "UCUM", "FMA", "RADLEX", "NCIt", "UMLS", "MSH", "ICD10", "I10", "I10P",
    "I9C", "ICD9CM", "ICDO3", "ATC", "RXNORM", "MDC", "ACR", "NEU", "BARI", "NCDR", "ITIS_TSN", "PUBCHEM_CID",
    "ISO639_1", "ISO639_2", "ISO3166_1", "IBSI", "HUGO", "NDC", "NICIP", "UNS", "UPC",
})

_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
_ENCAPSULATED_DOCUMENT, _DOCUMENT_LENGTH, _DOCUMENT_MIME = 0x00420011, 0x00420015, 0x00420012
# Attributes we set ourselves after cleaning.
_IDENTITY_REMOVED, _METHOD, _METHOD_CODES = 0x00120062, 0x00120063, 0x00120064
_LONGITUDINAL = 0x00280303
_BURNED_IN, _PIXEL_DATA = 0x00280301, 0x7FE00010
_FILE_META_KEPT = {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}
DOCUMENT_REPLACED = "Encapsulated Document replaced by a blank one"
PIXELS_NOT_CLEANED = "Burned In Annotation not removed"

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_DESIGNATOR = "99ANONYMIZED"
_DUMMY: dict[str, object] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
    "IS": "0", "DS": "0", "UR": "urn:x-anonymized",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "SV": 0, "UV": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00",
}


def _blank_pdf() -> bytes:
    # One empty page, with a correct cross-reference table so strict readers
    # open it without repair; no Info dictionary (no author, no title).
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
               b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]/Resources<<>>>>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


BLANK_PDF = _blank_pdf()
# Placeholders by MIME type of the encapsulated document: a valid, empty
# document of the same kind, so the object stays what its SOP class says.
_BLANK_DOCUMENTS: dict[str, bytes] = {
    "application/pdf": BLANK_PDF,
    "text/xml": b'<?xml version="1.0" encoding="UTF-8"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3"/>\n',
    "model/stl": b"solid anonymized\nendsolid anonymized\n",
    "model/obj": b"# anonymized\n",
    "model/mtl": b"# anonymized\n",
}


def blank_document(mime_type: str) -> bytes:
    """The placeholder for an encapsulated document of *mime_type* (even length,
    as OB values must be); none of the original document's bytes."""
    body = _BLANK_DOCUMENTS.get(mime_type.strip().lower(), b"ANONYMIZED")
    return body + b"\n" if len(body) % 2 else body


def _keyed(salt: str, purpose: str) -> bytes:
    return hmac.new(salt.encode("utf-8"), purpose.encode("utf-8"), hashlib.sha256).digest()


class UidMap:
    """Original UID -> ``2.25.<uuid5>`` under a namespace derived from a secret salt.

    Deterministic: the same salt maps the same original UID to the same new
    UID in every instance and every run; without the salt nobody can tell
    which original a new UID came from (or confirm a guess).
    """

    def __init__(self, salt: str) -> None:
        if not salt:
            raise ValueError("a de-identification salt is required")
        self._namespace = uuid.UUID(bytes=_keyed(salt, "filmless-pacs uid namespace")[:16])
        self._pseudonym_key = _keyed(salt, "filmless-pacs patient pseudonym")
        self._cache: dict[str, str] = {}

    def map(self, uid: str) -> str:
        """The new UID for *uid* (an empty value stays empty)."""
        uid = str(uid).strip(" \x00")
        if not uid:
            return uid
        new = self._cache.get(uid)
        if new is None:
            new = "2.25." + str(uuid.uuid5(self._namespace, uid).int)
            if len(self._cache) < 100_000:  # bounded: one export can hold millions
                self._cache[uid] = new
        return new

    __call__ = map

    def pseudonym(self, patient_id: str, fallback: str = "", issuer: str = "") -> str:
        """The pseudonym of a patient: same ID and issuer (or, without an ID,
        same fallback such as name + birth date), same pseudonym.

        The issuer (Issuer of Patient ID) tells apart two patients with the
        same local ID at two hospitals. Without an issuer the pseudonym is the
        one earlier versions gave; with one it differs from what exports made
        before the issuer was taken into account.
        """
        patient_id, issuer = patient_id.strip(), issuer.strip()
        if patient_id:
            # NUL cannot occur in an LO value: "ID" + NUL + "issuer" is
            # unambiguous, and differs from the ID alone and from a fallback.
            basis = patient_id + "\x00" + issuer if issuer else patient_id
        else:
            basis = "\x00" + fallback.strip()
        digest = hmac.new(self._pseudonym_key, basis.encode("utf-8"), hashlib.sha256).hexdigest()
        return "ANON" + digest[:12].upper()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _known(tag: int) -> bool:
    try:
        get_entry(tag)  # repeating groups (e.g. 50xx/60xx) included
    except KeyError:
        return False
    return True


def _vr(ds: Dataset, tag: int) -> str:
    # get_item never reads a deferred value: large elements stay on disk.
    raw = ds.get_item(tag, keep_deferred=True)
    vr = getattr(raw, "VR", None)
    if (not vr or vr == "UN") and _known(tag):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            pass
    return str(vr or "UN").split(" or ")[0]


def _names_a_class(tag: int) -> bool:
    # SOP Class and Transfer Syntax UIDs say what the object is, not whose it
    # is: a private class UID (a vendor's) stays, or the object is unreadable.
    keyword = keyword_for_tag(tag)
    return "ClassUID" in keyword or "TransferSyntaxUID" in keyword


def _well_known(uid: str) -> bool:
    """True for UIDs of the standard (classes, transfer syntaxes, coding
    schemes, well-known instances): pydicom's UID dictionary."""
    return uid in UID_dictionary


def _standard_code(item: Dataset) -> bool:
    scheme = _text(item[_CODING_SCHEME].value).strip() if _CODING_SCHEME in item else ""
    return scheme in STANDARD_CODING_SCHEMES


class _Cleaner:
    """One pass over a dataset; *strict* while inside a sequence the table
    replaces (see the module doc)."""

    def __init__(self, uid_map: UidMap) -> None:
        self.uids = uid_map
        self.document_replaced = False

    def dataset(self, ds: Dataset, depth: int = 0, strict: bool = False) -> None:
        if depth > 64:
            raise ValueError("sequences nested too deep to de-identify")
        code_item = _CODING_SCHEME in ds
        standard_code = code_item and _standard_code(ds)
        # A private scheme's designator is "99" + the organisation's name
        # ("99CHORAY"): it names the hospital as Institution Name (X/Z/D) does.
        # "L" (PS3.16 local codes) and the public schemes name nobody.
        local_designator = code_item and not standard_code and \
            _text(ds[_CODING_SCHEME].value).strip() not in ("", "L")
        for tag in list(ds.keys()):
            t = int(tag)
            group, element = t >> 16, t & 0xFFFF
            if group & 1 or element == 0 or (group >> 8) in (0x50, 0x60):
                # Private, group lengths, curves and overlay planes.
                del ds[tag]
                continue
            if not _known(t):
                del ds[tag]
                continue
            vr = _vr(ds, t)
            if t == _ENCAPSULATED_DOCUMENT:
                self._document(ds)
                continue
            if t == _CODING_SCHEME and local_designator:
                action = Action.C
            else:
                action = (CONFORMANT.get(t) or BASIC_PROFILE.get(t) or EXTRA.get(t)
                          or self._default(t, vr, strict, code_item, standard_code))
            if vr == "SQ":
                self._sequence(ds, t, action, depth, strict)
            else:
                self._element(ds, t, vr, action)

    @staticmethod
    def _default(tag: int, vr: str, strict: bool, code_item: bool, standard_code: bool) -> Action:
        """The action for an attribute the table does not list."""
        if vr in _DATE_VRS:
            # Every date and time goes, not only those the table lists: that
            # is what Longitudinal Temporal Information Modified = REMOVED says.
            return Action.D
        if vr == "UI" and tag == _CODING_SCHEME_UID and standard_code:
            # Not in pydicom's UID dictionary (only DICOM's own schemes are):
            # remapped, "SCT" was declared with a random 2.25 UID.
            return Action.K
        if vr == "UI":
            # Any UID may name an instance, a device or an organisation (e.g.
            # Acquisition UID, Pyramid UID): all are remapped but the class
            # and syntax attributes; well-known UIDs are kept by _element.
            return Action.K if _names_a_class(tag) else Action.U
        if code_item and tag in _CODE_VOCABULARY:
            return Action.K
        if code_item and tag in _CODE_TEXT:
            # Codes of a public scheme are vocabulary; a local scheme's
            # values and meanings are the hospital's own words.
            return Action.K if standard_code else Action.D
        if vr in (_STRICT_VRS if strict else _FREE_TEXT_VRS):
            return Action.D
        return Action.K

    def _sequence(self, ds: Dataset, tag: int, action: Action, depth: int, strict: bool) -> None:
        if action in (Action.X, Action.XD):
            del ds[tag]
        elif action in (Action.Z, Action.XZ, Action.XZD):
            # X/Z/D: an empty sequence is legal wherever removal is (Type 3)
            # and where it is not (Type 2 in some IODs); a dummy item is not.
            ds[tag] = DataElement(tag, "SQ", Sequence())
        else:
            # D, Z/D, C, X/Z/U*: the items stay as a skeleton (Graphic
            # Annotation and Content Sequence are Type 1), cleaned strictly.
            # K: cleaned with the general rules, strictly when the sequence
            # identifies someone (e.g. Requesting Physician Identification).
            inner = strict or action is not Action.K or "Identification" in keyword_for_tag(tag)
            for item in ds[tag].value or []:
                self.dataset(item, depth + 1, inner)

    def _element(self, ds: Dataset, tag: int, vr: str, action: Action) -> None:
        if action is Action.K:
            return
        if action is Action.X:
            del ds[tag]
        elif action in (Action.Z, Action.XZ):
            ds[tag] = DataElement(tag, vr, None)
        elif action is Action.U or action is Action.XZU or vr == "UI":
            # A UID given D (e.g. Annotation Group UID) gets a remapped UID:
            # a dummy string would not be a valid UID.
            value = ds[tag].value
            values = list(value) if isinstance(value, MultiValue | list | tuple) else [_text(value)]
            new = [str(v) if _well_known(str(v)) else self.uids.map(v) for v in values]
            ds[tag] = DataElement(tag, vr, new if len(new) != 1 else new[0])
        elif tag == _CODING_SCHEME:  # C: still a private scheme's designator ("99..."), naming nobody
            ds[tag] = DataElement(tag, vr, _DUMMY_DESIGNATOR)
        else:  # D, X/D, Z/D, X/Z/D, C: a dummy keeps even Type 1 conformant
            ds[tag] = DataElement(tag, vr, _DUMMY.get(vr, _DUMMY_TEXT))

    def _document(self, ds: Dataset) -> None:
        # Table E.1-1: D. A PDF (CDA, STL...) cannot be cleaned reliably (text
        # in streams, fonts, metadata, images): a blank document of the same
        # MIME type replaces it, and not one byte of the original goes out.
        mime = _text(ds[_DOCUMENT_MIME].value) if _DOCUMENT_MIME in ds else ""
        blank = blank_document(mime)
        ds[_ENCAPSULATED_DOCUMENT] = DataElement(_ENCAPSULATED_DOCUMENT, "OB", blank)
        if _DOCUMENT_LENGTH in ds:
            ds[_DOCUMENT_LENGTH] = DataElement(_DOCUMENT_LENGTH, "UL", len(blank))
        if _BURNED_IN in ds and _PIXEL_DATA not in ds:
            # Burned In Annotation of a document speaks of the document's
            # content: the blank one identifies nobody.
            ds[_BURNED_IN] = DataElement(_BURNED_IN, "CS", "NO")
        self.document_replaced = True


def _is_document(ds: Dataset) -> bool:
    """An encapsulated document without pixels: deidentify() blanks all of it."""
    return _ENCAPSULATED_DOCUMENT in ds and _PIXEL_DATA not in ds


def _issuer(ds: Dataset) -> str:
    issuer = _text(ds.get("IssuerOfPatientID"))
    if not issuer.strip():
        qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
        if qualifiers:
            issuer = _text(qualifiers[0].get("UniversalEntityID"))
    return issuer


def deidentify(ds: Dataset, uid_map: UidMap, *, pseudonym: str | None = None) -> Dataset:
    """De-identify *ds* in place (Basic Profile, see the module doc); returns it.

    *pseudonym* replaces Patient's Name and Patient ID; by default it is
    derived from the salt of *uid_map*, the original Patient ID and its
    Issuer of Patient ID. This does not decide whether the object may leave:
    ask :func:`may_release` (burned-in annotation).
    """
    if pseudonym is None:
        fallback = _text(ds.get("PatientName")) + "\x00" + _text(ds.get("PatientBirthDate"))
        pseudonym = uid_map.pseudonym(_text(ds.get("PatientID")), fallback, issuer=_issuer(ds))
    pixels_identify = burned_in(ds) and not _is_document(ds)
    if pixels_identify:
        log.warning("%s has burned-in annotation: its pixels are not de-identified", ds.get("SOPInstanceUID", "?"))
    cleaner = _Cleaner(uid_map)
    cleaner.dataset(ds)

    ds[_PATIENT_NAME] = DataElement(_PATIENT_NAME, "PN", pseudonym)
    ds[_PATIENT_ID] = DataElement(_PATIENT_ID, "LO", pseudonym)
    # YES would claim the pixels are clean too (PS3.3 C.7.1.1): they are not
    # when the object itself says they carry burned-in text.
    ds[_IDENTITY_REMOVED] = DataElement(_IDENTITY_REMOVED, "CS", "NO" if pixels_identify else "YES")
    method = [METHOD]
    if cleaner.document_replaced:
        method.append(DOCUMENT_REPLACED)
    if pixels_identify:
        method.append(PIXELS_NOT_CLEANED)
    ds[_METHOD] = DataElement(_METHOD, "LO", method if len(method) > 1 else METHOD)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds[_METHOD_CODES] = DataElement(_METHOD_CODES, "SQ", Sequence([code]))
    ds[_LONGITUDINAL] = DataElement(_LONGITUDINAL, "CS", "REMOVED")

    # The preamble is outside the dataset: pydicom writes back what it read.
    ds.preamble = b"\0" * 128
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in list(meta.keys()):
            if int(tag) not in _FILE_META_KEPT:
                del meta[tag]
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = uid_map.map(meta.MediaStorageSOPInstanceUID)
        if 0x00020000 in meta:
            del meta[0x00020000]  # pydicom writes the right group length itself
    return ds


def burned_in(ds: Dataset) -> bool:
    """True when the object says its pixels carry identifying text (not handled)."""
    return _text(ds.get("BurnedInAnnotation")).strip().upper() == "YES"


# SOP classes whose pixels typically carry text (screen grabs, scanned forms,
# ultrasound with the patient banner): without Burned In Annotation = NO we
# assume there is some.
BURNED_IN_LIKELY_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image (retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image (retired)",
}


@dataclass(frozen=True)
class Release:
    """Whether a de-identified copy of an object may leave the appliance.

    ``allowed`` False: do not send or write it; ``reason`` says why. When
    ``allowed`` is True a non-empty ``reason`` is a warning to pass on (e.g.
    burned-in text likely but not declared).
    """

    allowed: bool
    reason: str = ""


def may_release(ds: Dataset, *, include_burned_in: bool = False) -> Release:
    """May a de-identified copy of *ds* go out? Only the pixels are judged:
    :func:`deidentify` cleans the attributes, nobody cleans burned-in text.

    - Burned In Annotation = YES, or Recognizable Visual Features = YES (a
      face in a photograph or a video): not allowed, unless
      *include_burned_in* (the operator's explicit choice; the reason is
      then kept as a warning);
    - attribute absent or empty and a SOP class where text in the pixels is
      typical (:data:`BURNED_IN_LIKELY_CLASSES`): allowed, with a warning;
    - an encapsulated document (PDF, CDA...): allowed, whatever its Burned In
      Annotation says, since its document is replaced by a blank one; the
      reason says so;
    - otherwise (including Burned In Annotation = NO): allowed, no reason.

    Works on the original or the de-identified dataset (both keep Burned In
    Annotation and the SOP Class UID) and never reads the pixel data.
    """
    if _is_document(ds):
        # Burned In Annotation = YES there speaks of the document, which
        # deidentify() replaces by a blank one: nothing identifying is left.
        return Release(True, DOCUMENT_REPLACED.lower())
    if burned_in(ds):
        return Release(include_burned_in, "burned-in annotation (Burned In Annotation = YES)")
    if _text(ds.get("RecognizableVisualFeatures")).strip().upper() == "YES":
        # A face in a photograph or a video (dermatology, endoscopy of the
        # mouth, a camera in the operating room): no attribute cleaning
        # takes it out of the pixels, as with burned-in text.
        return Release(include_burned_in, "recognizable visual features (Recognizable Visual Features = YES)")
    declared = _text(ds.get("BurnedInAnnotation")).strip()
    sop_class = _text(ds.get("SOPClassUID")).strip()
    if not sop_class:
        meta = getattr(ds, "file_meta", None)
        sop_class = _text(meta.get("MediaStorageSOPClassUID")).strip() if meta is not None else ""
    if not declared and sop_class in BURNED_IN_LIKELY_CLASSES:
        return Release(True, f"burned-in annotation likely: {BURNED_IN_LIKELY_CLASSES[sop_class]} "
                             "without Burned In Annotation")
    return Release(True)


class Deidentifier:
    """De-identification with one salt: reuse it (or another with the same
    salt) for every object of a study, an export or a route, and UIDs and
    pseudonyms stay consistent."""

    def __init__(self, salt: str) -> None:
        self.uid_map = UidMap(salt)

    def apply(self, ds: Dataset, *, patient: tuple[str, str] | None = None) -> Dataset:
        """De-identify *ds* in place; returns it.

        *patient*: the index's (Patient ID, Issuer of Patient ID) of the
        object's study. The pseudonym is then that patient's, whatever the
        object itself says: one modality sends the issuer, another does not,
        and the index files both under one patient, who must get one
        pseudonym. Without it (or without an ID there) the object's own
        attributes decide.
        """
        pseudonym = None
        if patient is not None and patient[0].strip():
            pseudonym = self.pseudonym(patient[0], issuer=patient[1])
        return deidentify(ds, self.uid_map, pseudonym=pseudonym)

    def pseudonym(self, patient_id: str, issuer: str = "") -> str:
        """The pseudonym the patient with *patient_id* (at *issuer*) gets."""
        return self.uid_map.pseudonym(patient_id, issuer=issuer)

    def map_uids(self, uids: Iterable[str]) -> list[str]:
        """The new UIDs of *uids* (e.g. to tell a recipient which study is which)."""
        return [self.uid_map.map(u) for u in uids]


__all__ = [
    "BASIC_PROFILE", "BLANK_PDF", "BURNED_IN_LIKELY_CLASSES", "EXTRA", "STANDARD_CODING_SCHEMES", "Action",
    "Deidentifier", "Release", "UidMap", "blank_document", "burned_in", "deidentify", "may_release",
]
