"""The hospital's clock: instants are kept in UTC, and shown or written for
peers (DICOM DA/TM, HL7 timestamps, PDF reports) in the hospital's zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from .settings import Settings


def hospital_zone(settings: Settings) -> tzinfo:
    """The ``timezone`` setting, or the server's own zone when it is empty."""
    if settings.timezone:
        return ZoneInfo(settings.timezone)
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else UTC


def hospital_now(settings: Settings) -> datetime:
    """Now, aware, in the hospital's zone."""
    return datetime.now(hospital_zone(settings))


def in_hospital_zone(moment: datetime, settings: Settings) -> datetime:
    """*moment* in the hospital's zone (a naive one is taken as UTC, as the index keeps them)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(hospital_zone(settings))


def utc_offset(moment: datetime) -> str:
    """DICOM/HL7 offset of an aware *moment*: "+0700"."""
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def zone_is_unset_utc(settings: Settings) -> bool:
    """True when no zone was configured and the server's own is UTC: the
    start-up warning (a container's default, 7 hours off for Vietnam)."""
    return not settings.timezone and datetime.now().astimezone().utcoffset() == timedelta(0)
