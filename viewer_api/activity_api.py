"""The department's activity over a period (pacs.activity) over the JSON
API: what ``pacs activity`` prints, for the hospital's dashboards and the
monthly report.

    GET /api/activity[?from=YYYY-MM-DD&to=YYYY-MM-DD]        JSON
    GET /api/activity/{table}.csv[?from=...&to=...]           one table as CSV

Tables: exams, days, procedures, reads, turnaround, waiting. The period defaults to
this month so far on the hospital's clock. Administrators only; audited as
a ``query`` (it names staff, no patient).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from pacs.activity import TABLES, Activity, Period, PeriodError, activity
from pacs.timezones import hospital_now, hospital_zone

from .errors import HTTPProblem
from .security import guard
from .ui_api import _audit_detail

router = APIRouter(tags=["activity"])


def _activity(request: Request, first: str, last: str) -> Activity:
    pacs = request.app.state.pacs
    try:
        period = Period.parse(first, last, hospital_now(pacs.settings).date())
    except PeriodError as exc:
        raise HTTPProblem(400, str(exc)) from None
    _audit_detail(request, f"activity {period.first} to {period.last}")
    return activity(pacs.engine, period, hospital_zone(pacs.settings))


@router.get("/api/activity", summary="The department's activity over a period (thống kê); admin")
def get_activity(request: Request, first: str = Query("", alias="from", description="YYYY-MM-DD, default the 1st"),
                 last: str = Query("", alias="to", description="YYYY-MM-DD, included; default today"),
                 _: Any = guard("admin", action="query")) -> dict[str, Any]:
    return _activity(request, first, last).as_dict()


@router.get("/api/activity/{table}.csv", summary="One table of the activity as CSV (UTF-8 with BOM); admin")
def get_activity_csv(request: Request, table: str, first: str = Query("", alias="from"),
                     last: str = Query("", alias="to"), _: Any = guard("admin", action="query")) -> Response:
    if table not in TABLES:
        raise HTTPProblem(404, f"no table {table!r}: one of {', '.join(TABLES)}")
    found = _activity(request, first, last)
    name = f"activity-{table}-{found.first}-{found.last}.csv"
    return Response(found.csv(table).encode("utf-8"), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
