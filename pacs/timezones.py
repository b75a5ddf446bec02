"""The hospital's clock: instants are kept in UTC, and shown or written for
peers (DICOM DA/TM, HL7 timestamps, PDF reports) in the hospital's zone."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

from .settings import Settings


@lru_cache(maxsize=8)
def _zone_of_server(tz_variable: str | None) -> tzinfo:
    """The server's own zone as a full zone (its daylight-saving rules
    included) where it can be named: TZ, else /etc/localtime. A fixed
    offset (the one in force now) only as the last resort, e.g. a POSIX
    TZ rule that zoneinfo cannot read."""
    if tz_variable is not None:
        name = tz_variable.lstrip(":")
        if not name:
            return UTC  # TZ set but empty: the C library's UTC
        try:
            if name.startswith("/"):
                with open(name, "rb") as f:
                    return ZoneInfo.from_file(f, key=name)
            return ZoneInfo(name)
        except (OSError, ValueError, KeyError):  # KeyError: ZoneInfoNotFoundError
            pass  # a POSIX rule ("ICT-7"): the C library's offset below
    else:
        try:
            with open("/etc/localtime", "rb") as f:
                return ZoneInfo.from_file(f, key="localtime")
        except (OSError, ValueError):
            pass
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else UTC


def server_zone() -> tzinfo:
    """The zone the server's own clock runs in (TZ, /etc/localtime)."""
    return _zone_of_server(os.environ.get("TZ"))


def hospital_zone(settings: Settings) -> tzinfo:
    """The ``timezone`` setting, or the server's own zone when it is empty."""
    if settings.timezone:
        return ZoneInfo(settings.timezone)
    return server_zone()


def hospital_now(settings: Settings) -> datetime:
    """Now, aware, in the hospital's zone."""
    return datetime.now(hospital_zone(settings))


def in_hospital_zone(moment: datetime, settings: Settings) -> datetime:
    """*moment* in the hospital's zone (a naive one is taken as UTC, as the index keeps them)."""
    return in_zone(moment, hospital_zone(settings))


def utc_offset(moment: datetime) -> str:
    """DICOM/HL7 offset of an aware *moment*: "+0700"."""
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def in_zone(moment: datetime, zone: tzinfo) -> datetime:
    """*moment* in *zone*; a naive one is taken as UTC (what the index always held)."""
    return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment).astimezone(zone)


def hl7_timestamp(moment: datetime, zone: tzinfo) -> str:
    """An instant as an HL7 v2 TS/DTM in *zone* (the hospital's) with its
    offset, ``YYYYMMDDHHMMSS+ZZZZ``: a receiver needs no guess about our clock.
    A naive *moment* is taken as UTC."""
    local = in_zone(moment, zone)
    return local.strftime("%Y%m%d%H%M%S") + utc_offset(local)


def dicom_date_time(moment: datetime, zone: tzinfo) -> tuple[str, str, str]:
    """An instant as DICOM (DA, TM, TimezoneOffsetFromUTC) in *zone* (the
    hospital's): dates and times DICOM objects carry are local (PS3.3
    C.12.1.1.8), the offset saying which local. A naive *moment* is UTC."""
    local = in_zone(moment, zone)
    return local.strftime("%Y%m%d"), local.strftime("%H%M%S"), utc_offset(local)


def shown(moment: datetime | None, settings: Settings) -> str:
    """An instant for a person reading a table: the hospital's wall time
    with its offset ("2026-12-05 01:30:00 +0700"); "" for None."""
    if moment is None:
        return ""
    local = in_hospital_zone(moment, settings)
    return f"{local:%Y-%m-%d %H:%M:%S} {utc_offset(local)}"


def zone_is_unset_utc(settings: Settings) -> bool:
    """True when no zone was configured and the server's own is UTC: the
    start-up warning (a container's default, 7 hours off for Vietnam).
    UTC all year, that is: a zone at +0000 only in winter (Europe/London)
    was chosen by someone."""
    if settings.timezone:
        return False
    zone = server_zone()
    year = datetime.now(UTC).year
    return all(datetime(year, month, 1, 12, tzinfo=zone).utcoffset() == timedelta(0) for month in (1, 7))
