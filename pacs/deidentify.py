"""De-identification: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile.

What :func:`deidentify` does to a dataset (in place):

- applies the "Basic Prof." column of Table E.1-1 (encoded below as data,
  :data:`BASIC_PROFILE`) to every attribute, at every depth of nested sequences;
- removes every private attribute (the Retain Safe Private Option is not
  implemented), curves (50xx), overlay planes (60xx: Overlay Data is X, and a
  plane left without its data would be invalid), group lengths, and public
  attributes unknown to pydicom's dictionary (nobody can vouch for them);
- replaces UIDs with :class:`UidMap`: ``2.25.<uuid5 keyed by a secret salt>``, so
  one original UID becomes the same new UID in every instance, every sequence
  and every run with the same salt (Study/Series/SOP Instance, Frame of
  Reference, Referenced SOP Instance UIDs...);
- replaces Patient's Name and Patient ID with a pseudonym derived from the salt
  and the original Patient ID (same patient, same pseudonym);
- sets Patient Identity Removed = YES, De-identification Method, its Code
  Sequence (DCM 113100 "Basic Application Confidentiality Profile") and
  Longitudinal Temporal Information Modified = REMOVED.

Compound actions are resolved without knowing the IOD, always keeping the
object conformant: for plain attributes the last alternative wins (X/Z -> Z,
X/D, Z/D, X/Z/D -> D: an empty or dummy value is legal where removal might
not be); for sequences X/Z -> an empty sequence, X/D and X/Z/D -> removed
(those sequences are Type 3 in the image IODs), D, Z/D and X/Z/U* -> kept with
each item de-identified recursively (UIDs remapped, PHI inside removed).
Dates: Z dates become empty, D dates the dummy 19000101 / 000000.

Beyond the table (stricter): dates and times the table does not list
(Instance Creation Date, content item dates...) get dummy values, and so does
Text Value of structured-report content items (free text).

Pixel data is never touched. Burned-in annotation (text inside the pixels,
Burned In Annotation = YES, typical of ultrasound and secondary captures) is
OUT OF SCOPE: callers should report such objects (see :func:`burned_in`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Iterable
from enum import Enum

from pydicom.datadict import dictionary_VR, get_entry, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

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


def _parse_table(text: str) -> dict[int, Action]:
    tokens = text.split()
    return {int(tag, 16): Action(code) for tag, code in zip(tokens[::2], tokens[1::2], strict=True)}


BASIC_PROFILE: dict[int, Action] = _parse_table(_TABLE)

# Stricter than the table: free text inside structured-report content items,
# which the table keeps when it cleans the Content Sequence. (Dates and times
# the table does not list are handled by VR, see _Cleaner.dataset.)
EXTRA: dict[int, Action] = {
    0x0040A160: Action.D,  # Text Value
}
_DATE_VRS = {"DA", "DT", "TM"}

_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
# Attributes we set ourselves after cleaning.
_IDENTITY_REMOVED, _METHOD, _METHOD_CODES = 0x00120062, 0x00120063, 0x00120064
_LONGITUDINAL = 0x00280303
_FILE_META_KEPT = {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY: dict[str, object] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
    "IS": "0", "DS": "0", "UR": "urn:x-anonymized",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "SV": 0, "UV": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00",
}


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

    def pseudonym(self, patient_id: str, fallback: str = "") -> str:
        """The pseudonym of a patient: same ID (or, without one, same fallback
        such as name + birth date), same pseudonym."""
        basis = patient_id.strip() or "\x00" + fallback.strip()
        digest = hmac.new(self._pseudonym_key, basis.encode("utf-8"), hashlib.sha256).hexdigest()
        return "ANON" + digest[:12].upper()


def _text(value: object) -> str:
    if value is None:
        return ""
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
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if (not vr or vr == "UN") and _known(tag):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            pass
    return str(vr or "UN").split(" or ")[0]


def _uid_like(tag: int) -> bool:
    # Instance UIDs the table does not list (e.g. SOP Instance UID of
    # Concatenation Source) still point at instances: remap them too, so
    # references stay consistent. Class, syntax and coding-scheme UIDs stay.
    keyword = keyword_for_tag(tag)
    return "InstanceUID" in keyword or keyword.endswith("FrameOfReferenceUID")


class _Cleaner:
    def __init__(self, uid_map: UidMap) -> None:
        self.uids = uid_map

    def dataset(self, ds: Dataset, depth: int = 0) -> None:
        if depth > 64:
            raise ValueError("sequences nested too deep to de-identify")
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
            action = BASIC_PROFILE.get(t) or EXTRA.get(t) or self._default(t, vr)
            if vr == "SQ":
                self._sequence(ds, t, action, depth)
            else:
                self._element(ds, t, vr, action)

    @staticmethod
    def _default(tag: int, vr: str) -> Action:
        if vr in _DATE_VRS:
            # Every date and time goes, not only those the table lists: that
            # is what Longitudinal Temporal Information Modified = REMOVED says.
            return Action.D
        if vr == "UI" and _uid_like(tag):
            return Action.U
        return Action.K

    def _sequence(self, ds: Dataset, tag: int, action: Action, depth: int) -> None:
        if action in (Action.X, Action.XD, Action.XZD):
            del ds[tag]
        elif action in (Action.Z, Action.XZ):
            ds[tag] = DataElement(tag, "SQ", Sequence())
        else:  # K, C, D, Z/D, X/Z/U*: keep the items, each de-identified
            for item in ds[tag].value or []:
                self.dataset(item, depth + 1)

    def _element(self, ds: Dataset, tag: int, vr: str, action: Action) -> None:
        if action in (Action.K,):
            return
        if action is Action.X:
            del ds[tag]
        elif action in (Action.Z, Action.XZ):
            ds[tag] = DataElement(tag, vr, None)
        elif action is Action.U or action is Action.XZU:
            value = ds[tag].value
            if isinstance(value, MultiValue | list | tuple):
                ds[tag] = DataElement(tag, vr, [self.uids.map(v) for v in value])
            else:
                ds[tag] = DataElement(tag, vr, self.uids.map(_text(value)))
        else:  # D, X/D, Z/D, X/Z/D, C: a dummy keeps even Type 1 conformant
            ds[tag] = DataElement(tag, vr, _DUMMY.get(vr, _DUMMY_TEXT))


def deidentify(ds: Dataset, uid_map: UidMap, *, pseudonym: str | None = None) -> Dataset:
    """De-identify *ds* in place (Basic Profile, see the module doc); returns it.

    *pseudonym* replaces Patient's Name and Patient ID; by default it is
    derived from the salt of *uid_map* and the original Patient ID.
    """
    if pseudonym is None:
        fallback = _text(ds.get("PatientName")) + "\x00" + _text(ds.get("PatientBirthDate"))
        pseudonym = uid_map.pseudonym(_text(ds.get("PatientID")), fallback)
    if burned_in(ds):
        log.warning("%s has burned-in annotation: its pixels are not de-identified", ds.get("SOPInstanceUID", "?"))
    _Cleaner(uid_map).dataset(ds)

    ds[_PATIENT_NAME] = DataElement(_PATIENT_NAME, "PN", pseudonym)
    ds[_PATIENT_ID] = DataElement(_PATIENT_ID, "LO", pseudonym)
    ds[_IDENTITY_REMOVED] = DataElement(_IDENTITY_REMOVED, "CS", "YES")
    ds[_METHOD] = DataElement(_METHOD, "LO", METHOD)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds[_METHOD_CODES] = DataElement(_METHOD_CODES, "SQ", Sequence([code]))
    ds[_LONGITUDINAL] = DataElement(_LONGITUDINAL, "CS", "REMOVED")

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
    return _text(ds.get("BurnedInAnnotation")).upper() == "YES"


class Deidentifier:
    """De-identification with one salt: reuse it (or another with the same
    salt) for every object of a study, an export or a route, and UIDs and
    pseudonyms stay consistent."""

    def __init__(self, salt: str) -> None:
        self.uid_map = UidMap(salt)

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify *ds* in place; returns it."""
        return deidentify(ds, self.uid_map)

    def pseudonym(self, patient_id: str) -> str:
        """The pseudonym the patient with *patient_id* gets."""
        return self.uid_map.pseudonym(patient_id)

    def map_uids(self, uids: Iterable[str]) -> list[str]:
        """The new UIDs of *uids* (e.g. to tell a recipient which study is which)."""
        return [self.uid_map.map(u) for u in uids]


__all__ = ["BASIC_PROFILE", "EXTRA", "Action", "Deidentifier", "UidMap", "burned_in", "deidentify"]
