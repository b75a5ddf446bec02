"""Radiation dose summaries of X-Ray Radiation Dose SRs (PS3.16).

CT (TID 10011 CT Radiation Dose): each irradiation event (TID 10013 CT
Irradiation Event Data) with its CTDIvol, DLP, scanning length,
acquisition protocol and target region, and the accumulated DLP of the
examination (TID 10012). Projection X-ray (TID 10001 Projection X-Ray
Radiation Dose): each event (TID 10003 Irradiation Event X-Ray Data) with
its Dose Area Product and dose at the reference point, and the
accumulated totals (TID 10002 / 10004 / 10007), per acquisition plane.

Found by concept code (DCM), wherever the sender nested it: vendors
differ in which optional containers they write. Pure: works on the tree
:mod:`pacs.sr_content` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sr_content import Code, ContentItem, Numeric, SrDocument

# Concepts (DCM) of the dose templates.
XRAY_DOSE_REPORT = "113701"
PROCEDURE_REPORTED = "121058"
CT_ACCUMULATED = "113811"
CT_EVENTS_TOTAL = "113812"
CT_DLP_TOTAL = "113813"
CT_ACQUISITION = "113819"
CT_ACQUISITION_TYPE = "113820"
SCANNING_LENGTH = "113825"
MEAN_CTDIVOL = "113830"
DLP = "113838"
SSDE = "113930"
PHANTOM = "113835"
ACQUISITION_PROTOCOL = "125203"
TARGET_REGION = "123014"
EVENT_UID = "113769"
DATETIME_STARTED = "111526"
PROJECTION_ACCUMULATED = "113702"
PROJECTION_EVENT = "113706"
ACQUISITION_PLANE = "113764"
EVENT_TYPE = "113721"
DAP_TOTAL = "113722"
DOSE_RP_TOTAL = "113725"
FLUORO_DAP_TOTAL = "113726"
ACQUISITION_DAP_TOTAL = "113727"
FLUORO_TIME_TOTAL = "113730"
FRAMES_TOTAL = "113731"
DAP = "122130"
DOSE_RP = "113738"
# Procedure Reported values (SRT, then SNOMED CT since 2019; DCM for projection).
_CT_PROCEDURES = {("P5-08000", "SRT"), ("77477000", "SCT")}
_PROJECTION_PROCEDURES = {("113704", "DCM"), ("P5-40010", "SRT"), ("71651007", "SCT"), ("P5-40010", "SCT")}


@dataclass(frozen=True)
class Quantity:
    """A number with its unit (the UCUM code as the report wrote it)."""

    value: float
    unit: str

    def as_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}


def _quantity(item: ContentItem | None) -> Quantity | None:
    if item is None or not isinstance(item.value, Numeric) or item.value.value is None:
        return None
    unit = item.value.unit
    return Quantity(item.value.value, (unit.value or unit.meaning) if unit else "")


def _text_of(item: ContentItem | None) -> str:
    """A TEXT's text or a CODE's meaning (a protocol is TEXT, a region CODE)."""
    if item is None:
        return ""
    if isinstance(item.value, Code):
        return item.value.meaning or item.value.value
    return item.value if isinstance(item.value, str) else ""


def _json(value: Quantity | None) -> dict[str, Any] | None:
    return value.as_json() if value else None


@dataclass
class DoseEvent:
    """One irradiation event."""

    uid: str = ""
    started: str = ""
    protocol: str = ""
    target_region: str = ""
    # CT: the acquisition type (Spiral, Sequenced, Constant Angle...); projection: the event type and plane.
    kind: str = ""
    plane: str = ""
    ctdivol: Quantity | None = None
    dlp: Quantity | None = None
    scanning_length: Quantity | None = None
    ssde: Quantity | None = None
    phantom: str = ""
    dap: Quantity | None = None
    dose_rp: Quantity | None = None

    def as_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "started": self.started, "protocol": self.protocol,
                "target_region": self.target_region, "kind": self.kind, "plane": self.plane,
                "ctdivol": _json(self.ctdivol), "dlp": _json(self.dlp), "scanning_length": _json(self.scanning_length),
                "ssde": _json(self.ssde), "phantom": self.phantom, "dap": _json(self.dap),
                "dose_rp": _json(self.dose_rp)}


@dataclass
class DoseSummary:
    """The dose an RDSR reports: CT or projection, totals and events."""

    modality: str  # "CT" or "projection"
    procedure: str = ""
    events: list[DoseEvent] = field(default_factory=list)
    # CT: the accumulated DLP the report gives, and its event count.
    dlp_total: Quantity | None = None
    events_total: int | None = None
    # The DLP total is the sum of the events' (the report gave none).
    dlp_total_computed: bool = False
    # Projection: accumulated totals (summed over the acquisition planes when the units agree).
    dap_total: Quantity | None = None
    dose_rp_total: Quantity | None = None
    fluoro_dap_total: Quantity | None = None
    acquisition_dap_total: Quantity | None = None
    fluoro_time_total: Quantity | None = None
    frames_total: int | None = None
    planes: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"modality": self.modality, "procedure": self.procedure,
                               "events": [e.as_json() for e in self.events]}
        if self.modality == "CT":
            out.update(dlp_total=_json(self.dlp_total), dlp_total_computed=self.dlp_total_computed,
                       events_total=self.events_total)
        else:
            out.update(dap_total=_json(self.dap_total), dose_rp_total=_json(self.dose_rp_total),
                       fluoro_dap_total=_json(self.fluoro_dap_total),
                       acquisition_dap_total=_json(self.acquisition_dap_total),
                       fluoro_time_total=_json(self.fluoro_time_total), frames_total=self.frames_total,
                       planes=self.planes)
        return out


def _procedure(root: ContentItem) -> Code | None:
    item = next((c for c in root.children if c.concept and c.concept.is_(PROCEDURE_REPORTED)), None)
    return item.value if item is not None and isinstance(item.value, Code) else None


def dose_summary(document: SrDocument) -> DoseSummary | None:
    """The dose summary of an X-Ray Radiation Dose report (its root concept
    113701, whatever its SOP class: older scanners write one as an Enhanced
    or Comprehensive SR); None for any other document, or one that is
    neither CT nor projection X-ray (mammography's is projection)."""
    root = document.root
    if root.concept is None or not root.concept.is_(XRAY_DOSE_REPORT):
        return None
    procedure = _procedure(root)
    key = (procedure.value, procedure.scheme.upper()) if procedure else ("", "")
    ct = root.find(CT_ACQUISITION) is not None or root.find(CT_ACCUMULATED) is not None or key in _CT_PROCEDURES
    projection = root.find(PROJECTION_EVENT) is not None or root.find(PROJECTION_ACCUMULATED) is not None \
        or key in _PROJECTION_PROCEDURES
    name = (procedure.meaning or procedure.value) if procedure else ""
    if ct:
        return _ct(root, name)
    if projection:
        return _projection(root, name)
    return None


def _event_common(container: ContentItem) -> DoseEvent:
    uid_item = container.find(EVENT_UID)
    return DoseEvent(
        uid=uid_item.value if uid_item is not None and isinstance(uid_item.value, str) else "",
        started=_text_of(container.find(DATETIME_STARTED)),
        protocol=_text_of(container.find(ACQUISITION_PROTOCOL)),
        target_region=_text_of(container.find(TARGET_REGION)),
    )


# UCUM units of the dose figures a report may write, as a factor of their
# kind's unit: the TIDs name Gy, Gy.m2 (DAP), mGy.cm (DLP), but devices write
# the DAP in dGy.cm2, cGy.cm2, uGy.m2 or mGy.cm2 too (one of two C-arms of a
# study in Gy.m2, the other in dGy.cm2). UCUM is case-sensitive ("MGy" is a
# megagray): no unit is guessed at.
_UNITS: dict[str, tuple[str, float]] = {
    **{f"{p}Gy": ("Gy", f) for p, f in (("", 1.0), ("d", 1e-1), ("c", 1e-2), ("m", 1e-3), ("u", 1e-6))},
    **{f"{p}Gy.{a}": ("Gy.m2", f * s) for p, f in (("", 1.0), ("d", 1e-1), ("c", 1e-2), ("m", 1e-3), ("u", 1e-6))
       for a, s in (("m2", 1.0), ("dm2", 1e-2), ("cm2", 1e-4), ("mm2", 1e-6))},
    **{f"{p}Gy.{a}": ("mGy.cm", f * s) for p, f in (("", 1e3), ("d", 1e2), ("c", 1e1), ("m", 1.0), ("u", 1e-3))
       for a, s in (("m", 100.0), ("cm", 1.0), ("mm", 0.1))},
    "s": ("s", 1.0), "min": ("s", 60.0), "ms": ("s", 1e-3), "h": ("s", 3600.0),
    "mm": ("mm", 1.0), "cm": ("mm", 10.0), "m": ("mm", 1000.0),
}


def _rounded(value: float) -> float:
    """*value* without the binary noise of a sum (297.5 + 314.8 is 612.3, not 612.3000000000001)."""
    return float(f"{value:.12g}")


def add(values: list[Quantity | None]) -> Quantity | None:
    """The sum of *values*: in their unit when they share one, else in their
    kind's unit (25 dGy.cm2 + 0.00355 Gy.m2 = 0.0038 Gy.m2); None when one
    is missing or the units are not one kind (a total of missing or
    unconvertible figures would be wrong, not approximate)."""
    given = [v for v in values if v is not None]
    if not values or len(given) != len(values):
        return None
    if len({v.unit for v in given}) == 1:
        return Quantity(_rounded(sum(v.value for v in given)), given[0].unit)
    kinds = [_UNITS.get(v.unit) for v in given]
    if any(k is None for k in kinds) or len({k[0] for k in kinds if k}) != 1:
        return None
    return Quantity(_rounded(sum(v.value * k[1] for v, k in zip(given, kinds) if k)), kinds[0][0] if kinds[0] else "")



def _ct(root: ContentItem, procedure: str) -> DoseSummary:
    summary = DoseSummary("CT", procedure)
    for container in root.find_all(CT_ACQUISITION):
        event = _event_common(container)
        event.kind = _text_of(container.find(CT_ACQUISITION_TYPE))
        event.scanning_length = _quantity(container.find(SCANNING_LENGTH))
        event.ctdivol = _quantity(container.find(MEAN_CTDIVOL))
        event.dlp = _quantity(container.find(DLP))
        event.ssde = _quantity(container.find(SSDE))
        event.phantom = _text_of(container.find(PHANTOM))
        summary.events.append(event)
    accumulated = root.find(CT_ACCUMULATED) or root
    summary.dlp_total = _quantity(accumulated.find(CT_DLP_TOTAL))
    count = _quantity(accumulated.find(CT_EVENTS_TOTAL))
    summary.events_total = int(count.value) if count else None
    if summary.dlp_total is None and summary.events:
        summary.dlp_total = add([e.dlp for e in summary.events])
        summary.dlp_total_computed = summary.dlp_total is not None
    return summary


def _projection(root: ContentItem, procedure: str) -> DoseSummary:
    summary = DoseSummary("projection", procedure)
    for container in root.find_all(PROJECTION_EVENT):
        event = _event_common(container)
        event.kind = _text_of(container.find(EVENT_TYPE))
        event.plane = _text_of(container.find(ACQUISITION_PLANE))
        event.dap = _quantity(container.find(DAP))
        event.dose_rp = _quantity(container.find(DOSE_RP))
        summary.events.append(event)
    # One accumulated container per plane (a biplane system writes two).
    planes = root.find_all(PROJECTION_ACCUMULATED)
    for plane in planes:
        frames = _quantity(plane.find(FRAMES_TOTAL))
        summary.planes.append({
            "plane": _text_of(plane.find(ACQUISITION_PLANE)),
            "dap_total": _json(_quantity(plane.find(DAP_TOTAL))),
            "dose_rp_total": _json(_quantity(plane.find(DOSE_RP_TOTAL))),
            "fluoro_time_total": _json(_quantity(plane.find(FLUORO_TIME_TOTAL))),
            "frames_total": int(frames.value) if frames else None,
        })
    holders = planes or [root]
    summary.dap_total = add([_quantity(p.find(DAP_TOTAL)) for p in holders])
    summary.dose_rp_total = add([_quantity(p.find(DOSE_RP_TOTAL)) for p in holders])
    summary.fluoro_dap_total = add([_quantity(p.find(FLUORO_DAP_TOTAL)) for p in holders])
    summary.acquisition_dap_total = add([_quantity(p.find(ACQUISITION_DAP_TOTAL)) for p in holders])
    summary.fluoro_time_total = add([_quantity(p.find(FLUORO_TIME_TOTAL)) for p in holders])
    frame_counts = [_quantity(p.find(FRAMES_TOTAL)) for p in holders]
    summary.frames_total = int(sum(f.value for f in frame_counts if f)) if any(frame_counts) else None
    return summary
