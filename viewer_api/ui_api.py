"""The JSON API behind the web viewer: login, the reading worklist, study
details, reports (draft, sign, amend, PDF), administration (users, tokens,
the audit trail) and stable viewer links an EMR can embed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from pacs import audit as audit_log
from pacs.audit import Event, patient_cx
from pacs.auth import ROLES, SESSION_HOURS, AuthError, LoginThrottled, Principal
from pacs.header import valid_uid
from pacs.report_signature import needs_radiologist
from pacs.critical_results import CriticalError
from pacs.reports import ReportError, ReportService
from pacs.priority import FILTERS as PRIORITY_FILTERS
from pacs.reading_claims import claim_of
from pacs.signing_keys import PinLocked, SigningKeyError, WrongPin
from pacs.signing_keys import show as show_certificate
from pacs.studylist import SORTS, patient_of, reading_of, study_detail, study_list

from .errors import HTTPProblem, JsonBody, problem
from .mediatypes import video_media_types
from .security import (COOKIE, READERS, UNATTENDED_HEADER, audit, audit_patients, guard, principal_of,
                       request_target)
from .streaming import ClosingStreamingResponse
from .templates_api import MAX_ID as MAX_TEMPLATE_ID
from .templates_api import report_source

router = APIRouter(tags=["viewer"])


class Login(BaseModel):
    # No control characters: a NUL reached the index's login throttle (a 500 on PostgreSQL).
    username: str = Field(..., min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    password: str = Field(..., min_length=1, max_length=256)


class ReportText(BaseModel):
    findings: str = Field("", max_length=100_000)
    impression: str = Field("", max_length=100_000)
    # The draft revision the author loaded (0: none yet); absent: no check.
    revision: int | None = Field(None, ge=0)
    # The report template the text was started from (the viewer's picker), named in the audit event.
    template_id: int | None = Field(None, ge=1, le=MAX_TEMPLATE_ID)
    # Its version when picked: changed before the save, the trail names the one the text came from.
    template_version: int | None = Field(None, ge=1, le=2**31 - 1)


class SignRequest(BaseModel):
    # The draft revision the signer read; absent: no check.
    revision: int | None = Field(None, ge=0)
    # The PIN of the radiologist's signing certificate (report_signature
    # radiologist or both; pacs.signing_keys): never logged nor audited.
    pin: str | None = Field(None, max_length=256)
    # The report holds a critical result (kết quả nguy kịch, pacs.critical_results), and what must be acted on.
    critical: bool = False
    critical_note: str = Field("", max_length=2000)


class NewUser(JsonBody):
    username: str
    role: str
    password: str | None = None
    display_name: str = ""
    # Updating an existing user resets the password and ends their sessions;
    # their API tokens are revoked too unless kept (a system account's reset).
    keep_tokens: bool = False


class NewToken(JsonBody):
    username: str
    name: str = Field(..., min_length=1)
    days: int | None = Field(None, ge=1, le=3650)


def _user_json(p: Principal) -> dict[str, str]:
    return {"username": p.username, "display_name": p.display_name, "role": p.role}


def _audit_detail(request: Request, detail: str, patient_id: str = "") -> None:
    """Name what an administrative action did to whom in the audit event its
    guard prepared (written by AuditMiddleware with the outcome); *patient_id*
    where the study that would tell it is gone by the time the event is written."""
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        event.detail = detail[:500]
        if patient_id:
            event.patient_id = patient_id


def _session_cookie_secure(request: Request) -> bool:
    """Whether the session cookie must be Secure: over HTTPS, served by us
    (http_tls) or by a trusted proxy in front (X-Forwarded-Proto)."""
    return bool(request.app.state.pacs.settings.http_tls) or request.url.scheme == "https"


# -- authentication -------------------------------------------------------------------
@router.post("/api/auth/login", summary="Log in; returns a session token (also set as a cookie)")
def login(request: Request, body: Login) -> JSONResponse:
    pacs = request.app.state.pacs
    client = request.client.host if request.client else ""
    try:
        token, principal = pacs.auth.login(body.username, body.password, client)
    except LoginThrottled as exc:
        for lock in exc.new_locks:
            audit(request, "login-lockout", Principal(body.username, ""), outcome="denied",
                  detail=f"{lock} after repeated failed logins")
        audit(request, "login-failed", Principal(body.username, ""),
              outcome="failure" if exc.new_locks else "denied",
              detail="wrong password; now locked" if exc.new_locks else "refused unchecked: login locked")
        answer = problem(429, str(exc))
        answer.headers["Retry-After"] = str(exc.retry_after)
        return answer
    except AuthError as exc:
        audit(request, "login-failed", Principal(body.username, ""), outcome="failure")
        raise HTTPProblem(401, str(exc)) from None
    audit(request, "login", principal)
    response = JSONResponse({"token": token, "user": _user_json(principal)})
    # The server ends an idle session sooner (pacs.auth.SESSION_IDLE_MINUTES).
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=SESSION_HOURS * 3600, path="/",
                        secure=_session_cookie_secure(request))
    return response


@router.post("/api/auth/logout", status_code=204, summary="Log out (revokes the session token)")
def logout(request: Request) -> Response:
    from .security import token_of

    token = token_of(request)
    if token:
        # Who ended their session, before the token that names them is gone.
        principal = principal_of(request)
        request.app.state.pacs.auth.revoke(token=token)
        if principal is not None:
            audit(request, "logout", principal)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", secure=_session_cookie_secure(request), httponly=True,
                           samesite="strict")
    return response


@router.get("/api/me", summary="Who is logged in")
def me(request: Request) -> dict[str, str]:
    principal = principal_of(request)
    if principal is None:
        raise HTTPProblem(401, "not logged in")
    return _user_json(principal)


# -- reading worklist and study ----------------------------------------------------------
# As QIDO-RS (pacs.query): an offset the index can bind.
MAX_OFFSET = 2**31 - 1


def _referring_filter(principal: Principal) -> str:
    return principal.display_name if principal.role == "referring" else ""


def _signed_only(principal: Principal) -> bool:
    # Drafts (an amendment in progress too) are the radiologists' own.
    return principal.role not in ("radiologist", "admin")


def _reads(principal: Principal) -> bool:
    # Who reads and reports: sees who is reading what, and the urgent count.
    return principal.role in ("radiologist", "admin")


@router.get("/api/worklist", summary="Studies to read: search by name (no diacritics needed), ID, date, modality, "
                                     "status, priority, claimed by me; urgent unreported first")
def worklist(
    request: Request,
    q: str = "",
    patient_id: str = "",
    date_from: str = "",
    date_to: str = "",
    modality: str = "",
    status: str = "",
    accession: str = "",
    priority: str = Query("", description="stat, high, urgent (stat or high) or routine (any other)"),
    mine: bool = Query(False, description="only the studies the caller's running claims hold"),
    sort: str = Query("priority", description="priority: urgent unreported first (longest waiting first), "
                                              "then newest; date: newest first; waiting: unreported first, "
                                              "longest waiting first"),
    limit: int = 50,
    offset: int = 0,
    principal: Principal = guard(*READERS, action="query"),
) -> dict[str, Any]:
    if status not in ("", "unread", "draft", "signed"):
        raise HTTPProblem(400, "status must be unread, draft or signed")
    if priority not in ("", *PRIORITY_FILTERS):
        raise HTTPProblem(400, f"priority must be one of {', '.join(PRIORITY_FILTERS)}")
    if sort not in SORTS:
        raise HTTPProblem(400, f"sort must be one of {', '.join(SORTS)}")
    for value in (date_from, date_to):
        if value and not (len(value) == 8 and value.isdigit()):
            raise HTTPProblem(400, "dates are YYYYMMDD")
    if not 1 <= limit <= 500 or not 0 <= offset <= MAX_OFFSET:
        # The database binds it as a 64-bit integer: a larger one was a 500.
        raise HTTPProblem(400, f"limit must be 1-500 and offset 0-{MAX_OFFSET}")
    found = study_list(
        request.app.state.pacs.engine, name=q.strip(), patient_id=patient_id.strip(), date_from=date_from,
        date_to=date_to, modality=modality.strip().upper(), status=status, accession=accession.strip(),
        referring=_referring_filter(principal), signed_only=_signed_only(principal), priority=priority,
        claimed_by=principal.username if mine else "", sort=sort, viewer=principal.username,
        count_urgent=_reads(principal), limit=limit, offset=offset,
    )
    if not _reads(principal):
        for item in found["items"]:
            item["claim"] = None  # the radiologists' own business
    # Who was shown, each with the issuer of the ID (two hospitals' BN100 are two people).
    shown = [patient_cx(item["patient_id"] or "", item["issuer"] or "") for item in found["items"]]
    audit_patients(request, _not_shown_this_hour(request, principal, shown))
    return found


def _not_shown_this_hour(request: Request, principal: Principal, shown: list[str]) -> list[str]:
    """The patients of a worklist answer its audit event names: all of them for a
    search the user made; for the viewer's automatic refresh (every 30 s, unattended)
    only those this user was not shown in this hour, and no event at all when none
    is new: "who saw which patient" stays whole (each at least once an hour on each
    node) without 120 events an hour of the same names from an open worklist."""
    memory = request.app.state.pacs.patients_shown
    hour = datetime.now(timezone.utc).strftime("%Y%m%d%H")
    keys = [(principal.username, patient, hour) for patient in shown]
    if request.headers.get(UNATTENDED_HEADER, "") != "1":
        for key in keys:
            memory.add(key)
        return shown
    new = [key[1] for key in keys if not memory.seen(key)]
    for key in keys:
        memory.add(key)
    if not new:
        request.state.audit = None
    return new


@router.get("/api/studies/{study}/priors", summary="The other studies of the study's patient (comparison)")
def priors(request: Request, study: str, limit: int = 20,
           principal: Principal = guard(*READERS, action="query")) -> dict[str, Any]:
    """The other studies of this study's patient, newest first, as far as the
    user may see them (a referring physician: the ones they referred). By
    the index's patient, not the Patient ID, which another issuer's patient
    may share."""
    if not 1 <= limit <= 500:
        raise HTTPProblem(400, "limit must be 1-500")
    engine = request.app.state.pacs.engine
    patient_pk = patient_of(engine, study)
    if patient_pk is None:
        raise HTTPProblem(404, f"no study {study}")
    found = study_list(engine, patient_pk=patient_pk, referring=_referring_filter(principal),
                       signed_only=_signed_only(principal), limit=limit + 1)
    others = [item for item in found["items"] if item["study_uid"] != study][:limit]
    audit_patients(request, (patient_cx(item["patient_id"] or "", item["issuer"] or "") for item in others))
    return {"items": others}


@router.get("/api/studies/{study}", summary="A study with its series and instances")
def study(request: Request, study: str, principal: Principal = guard(*READERS, action="view")) -> dict[str, Any]:
    detail = study_detail(request.app.state.pacs.engine, study)
    if detail is None:
        raise HTTPProblem(404, f"no study {study}")
    detail.pop("changed_at", None)  # FHIR's meta.lastUpdated: not a field of this API
    # Report status, priority, arrival and who is reading it, as the worklist shows them.
    detail.update(reading_of(request.app.state.pacs.engine, study, signed_only=_signed_only(principal),
                             viewer=principal.username))
    if not _reads(principal):
        detail["claim"] = None
    for series in detail["series"]:
        for instance in series["instances"]:
            # The viewer plays a video (its stream at bulk/7FE00010) in a
            # <video> element: it has no frames to render one by one.
            instance["video"] = next(iter(video_media_types(instance["transfer_syntax_uid"] or "")), None)
    return detail


# -- deletion (admin) ------------------------------------------------------------------------
def _delete(request: Request, uids: tuple[str, ...], reason: str, force: bool = False) -> dict[str, Any]:
    # Imported here: the maintenance jobs (codecs among them) are not needed to start serving.
    from pacs.maintenance.delete import DeleteRefused, Target, delete_target

    if not all(valid_uid(uid) for uid in uids):
        raise HTTPProblem(400, "not a DICOM UID (digits and dots, at most 64 characters)")
    target = Target(*uids)
    event = getattr(request.state, "audit", None)
    try:
        report = delete_target(request.app.state.pacs, target, reason=reason, force=force,
                               event=event if isinstance(event, Event) else None)
    except DeleteRefused as exc:
        _audit_detail(request, f"{target.level} not deleted: {exc}")
        raise HTTPProblem(exc.http_status, str(exc)) from None
    # Written with the deletion's commit: AuditMiddleware must not write it again.
    request.state.audit = None
    return report.as_dict()


_REASON = Query(..., min_length=1, max_length=400, description="why (kept in the audit trail)")
_FORCE = Query(False, description="also from a study with a signed report (a whole study's reports go with it)")


@router.delete("/api/studies/{study}", summary="Delete a study (sent in error); admin, audited with the reason")
def delete_study(request: Request, study: str, reason: str = _REASON, force: bool = _FORCE,
                 _: Principal = guard("admin", action="delete")) -> dict[str, Any]:
    return _delete(request, (study,), reason, force)


@router.delete("/api/studies/{study}/series/{series}", summary="Delete one series of a study; admin, audited")
def delete_series(request: Request, study: str, series: str, reason: str = _REASON, force: bool = _FORCE,
                  _: Principal = guard("admin", action="delete")) -> dict[str, Any]:
    return _delete(request, (study, series), reason, force)


@router.delete("/api/studies/{study}/series/{series}/instances/{sop}",
               summary="Delete one instance; admin, audited")
def delete_instance(request: Request, study: str, series: str, sop: str, reason: str = _REASON,
                    force: bool = _FORCE, _: Principal = guard("admin", action="delete")) -> dict[str, Any]:
    return _delete(request, (study, series, sop), reason, force)


# -- reports ---------------------------------------------------------------------------------
def _reports(request: Request) -> ReportService:
    return ReportService(request.app.state.pacs)


def _report_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    # Not every RefusedRequest: a signing key's refusals (PinLocked, WrongPin)
    # are answered by the sign route itself (Retry-After, the audit).
    except (ReportError, CriticalError) as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


def _with_signing(request: Request, report: dict[str, Any]) -> dict[str, Any]:
    """A report answer with what signing it takes: the report_signature
    mode, and whether the viewer must ask the radiologist's PIN."""
    settings = request.app.state.pacs.settings
    report["digital_signature"] = {"mode": settings.report_signature, "pin_required": needs_radiologist(settings)}
    return report


@router.get("/api/studies/{study}/report", summary="The study's report (drafts only for radiologists)")
def get_report(request: Request, study: str, principal: Principal = guard(*READERS, action="view")) -> dict[str, Any]:
    return _with_signing(request, _report_call(_reports(request).get, study, signed_only=_signed_only(principal)))


@router.put("/api/studies/{study}/report", summary="Save the draft report")
def save_report(request: Request, study: str, body: ReportText,
                principal: Principal = guard("radiologist", action="report-update")) -> dict[str, Any]:
    if body.template_id is not None:
        # Which template the text came from stays readable: templates are archived, never deleted.
        event = getattr(request.state, "audit", None)
        if isinstance(event, Event):
            source = report_source(request, body.template_id, principal.username, body.template_version)
            event.detail = f"{event.detail} (text from {source})"[:500]
    return _with_signing(request, _report_call(_reports(request).save_draft, study, body.findings, body.impression,
                                               principal.username, revision=body.revision))


@router.post("/api/studies/{study}/report/sign", summary="Sign the draft (immutable afterwards); with "
             "report_signature on, the PDF is digitally signed (PAdES), the radiologist's key opened with `pin`")
def sign_report(request: Request, study: str, body: SignRequest | None = None,
                principal: Principal = guard("radiologist", action="report-sign")) -> Any:
    reading = claim_of(request.app.state.pacs.engine, study)
    try:
        signed = _report_call(_reports(request).sign, study, principal.username, principal.display_name,
                              revision=body.revision if body else None, pin=body.pin if body else None,
                              critical=bool(body and body.critical), critical_note=body.critical_note if body else "")
    except PinLocked as exc:
        _audit_detail(request, f"{request.url.path}: refused unchecked: signing locked by wrong PINs")
        answer = problem(429, str(exc))
        answer.headers["Retry-After"] = str(exc.retry_after)
        return answer
    except WrongPin as exc:
        _audit_detail(request, f"{request.url.path}: wrong signing PIN"
                      + ("; signing now locked" if exc.locked_until else f", {exc.tries_left} tries left"))
        if exc.locked_until is not None:
            audit(request, "signature-lockout", principal, outcome="denied", study_uid=study,
                  detail=f"signing certificate of {principal.username} locked until {exc.locked_until.isoformat()} "
                         "after repeated wrong PINs")
        raise HTTPProblem(exc.http_status, str(exc)) from None
    except SigningKeyError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
    settings = request.app.state.pacs.settings
    if settings.report_signature != "off":
        cert = show_certificate(request.app.state.pacs.engine, principal.username) \
            if needs_radiologist(settings) else None
        what = f"certificate {cert.subject} (serial {cert.serial})" if cert else "the hospital's seal"
        _audit_detail(request, f"{request.url.path}: PDF digitally signed ({settings.report_signature}) with {what}")
    if reading is not None:
        # The signature ended it (pacs.reading_claims.end_on_signature): said in the trail as a release.
        audit(request, "claim-release", principal, study_uid=study,
              detail=f"claim of {reading.username} ({reading.display_name}) ended by the report's signature")
    return _with_signing(request, signed)


@router.post("/api/studies/{study}/report/amend", summary="Start an amendment (a new version)")
def amend_report(request: Request, study: str,
                 principal: Principal = guard("radiologist", action="report-amend")) -> dict[str, Any]:
    return _with_signing(request, _report_call(_reports(request).amend, study, principal.username))


@router.get("/api/studies/{study}/report/signature",
            summary="The digital signature of the signed report's PDF: signer, certificate validity at signing, "
                    "integrity, trust")
def report_signature(request: Request, study: str, version: int | None = Query(None, ge=1),
                     principal: Principal = guard(*READERS, action="view")) -> dict[str, Any]:
    return _report_call(_reports(request).signature, study, version)


@router.get("/api/studies/{study}/report/pdf", summary="The signed report as PDF")
def report_pdf(request: Request, study: str, version: int | None = None,
               principal: Principal = guard(*READERS, action="download")) -> Response:
    data = _report_call(_reports(request).pdf, study, version)
    return Response(data, media_type="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="report-{study}.pdf"'})


# -- media for the patient (CD / USB) ---------------------------------------------------------
@router.get("/api/studies/{study}/media",
            summary="The study as a DICOM CD/USB file-set (DICOMDIR, README.TXT, DICOM/...) in a zip, streamed")
def study_media(request: Request, study: str,
                uncompressed: bool = Query(False, description="every object in Explicit VR Little Endian "
                                                              "(STD-GEN-CD) instead of as stored"),
                _: Principal = guard(*READERS, action="export")) -> Response:
    """What ``pacs export UID --media --out FILE.zip`` writes, sent as it is
    written (the zip is never whole in memory nor on disk). Audited as an
    export by the user; an object that cannot be written breaks the answer
    off (the zip is then incomplete, and the audit event says so)."""
    # Imported here: the maintenance jobs (codecs among them) are not needed to start serving.
    from pacs.maintenance.export import study_patient
    from pacs.maintenance.media import MediaDownload, media_zip

    if not valid_uid(study):
        raise HTTPProblem(400, "not a DICOM UID (digits and dots, at most 64 characters)")
    pacs = request.app.state.pacs
    if study_patient(pacs, study) is None:
        raise HTTPProblem(404, f"no study {study}")
    event = getattr(request.state, "audit", None)
    outcome = MediaDownload()
    body = media_zip(pacs, study, uncompressed=uncompressed, outcome=outcome)
    # The first object is written now: a store that cannot be read is an
    # error status, not a 200 whose body breaks off at once.
    first = next(body, b"")

    def chunks() -> Iterator[bytes]:
        try:
            yield first
            yield from body
        finally:
            body.close()
            if isinstance(event, Event) and outcome.detail:
                event.detail = f"{request_target(request)}: {outcome.detail}"[:500]

    return ClosingStreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="DICOM-{study}.zip"'})


# -- administration ----------------------------------------------------------------------------
@router.get("/api/users", summary="Users and their roles")
def list_users(request: Request, _: Principal = guard("admin", action="query")) -> list[dict[str, Any]]:
    return request.app.state.pacs.auth.list_users()


@router.post("/api/users", status_code=201,
             summary="Create or update a user (an update resets the password, ends sessions, revokes API tokens "
                     "unless keep_tokens)")
def add_user(request: Request, body: NewUser, _: Principal = guard("admin", action="user-add")) -> dict[str, Any]:
    auth = request.app.state.pacs.auth
    before = auth.role_of(body.username)
    _audit_detail(request, auth.describe_user_change(body.username, body.role, before, keep_tokens=body.keep_tokens))
    if body.role not in ROLES:
        raise HTTPProblem(400, f"role must be one of {', '.join(ROLES)}")
    try:
        password = auth.add_user(body.username, body.role, body.password, body.display_name,
                                 revoke_tokens=not body.keep_tokens)
    except AuthError as exc:
        raise HTTPProblem(400, str(exc)) from None
    return {"username": body.username, "role": body.role, "password": None if body.password else password,
            "sessions_ended": before is not None, "tokens_revoked": before is not None and not body.keep_tokens}


@router.post("/api/tokens", status_code=201, summary="Create an API token for a user")
def add_token(request: Request, body: NewToken, _: Principal = guard("admin", action="token-create")) -> dict[str, Any]:
    auth = request.app.state.pacs.auth
    _audit_detail(request, f"token {body.name!r} for user {body.username} (role {auth.role_of(body.username)}), "
                           + (f"expires in {body.days} days" if body.days else "no expiry"))
    try:
        token = auth.create_token(body.username, body.name, body.days)
    except AuthError as exc:
        raise HTTPProblem(400, str(exc)) from None
    return {"username": body.username, "name": body.name, "token": token}


@router.delete("/api/tokens/{username}/{name}", summary="Revoke a user's tokens of that name")
def revoke_token(request: Request, username: str, name: str,
                 _: Principal = guard("admin", action="token-revoke")) -> dict[str, int]:
    auth = request.app.state.pacs.auth
    revoked = auth.revoke(username=username, name=name)
    _audit_detail(request, f"tokens {name!r} of user {username} (role {auth.role_of(username)}): {revoked} revoked")
    return {"revoked": revoked}


_AUDIT_FORMATS = ("json", "atna", "syslog")


@router.get("/api/audit", summary="The audit trail (JSON, ATNA-shaped JSON or syslog lines)")
def get_audit(request: Request, study: str = "", user: str = "", action: str = "", format: str = "json",
              limit: int = 1000, _: Principal = guard("admin", action="query")) -> Any:
    # A negative LIMIT is "no limit" to SQLite and a huge one overflows its
    # integer (500): refuse it like the other list routes do.
    if limit < 0:
        raise HTTPProblem(400, "limit must be >= 0")
    if format not in _AUDIT_FORMATS:
        # Not silently JSON: a client asking for XML must learn it gets none.
        raise HTTPProblem(400, f"format must be one of {', '.join(_AUDIT_FORMATS)}, not {format[:40]!r}")
    pacs = request.app.state.pacs
    pacs.audit.flush()
    events = audit_log.query(pacs.engine, study_uid=study, user=user, action=action, limit=min(limit, 10_000))
    if format == "atna":
        return [audit_log.to_atna(e, pacs.settings.ae_title) for e in events]
    if format == "syslog":
        return Response("\n".join(audit_log.to_syslog(e, pacs.settings.ae_title) for e in events) + "\n",
                        media_type="text/plain")
    return [{**e, "at": e["at"].isoformat()} for e in events]


# -- stable links for the EMR ------------------------------------------------------------------
@router.get("/viewer/study/{study}", summary="Open a study in the web viewer (EMR link)")
def viewer_study(study: str) -> RedirectResponse:
    return RedirectResponse(f"/#/study/{study}", status_code=302)


# :path: an accession number may hold a "/" (legal in SH), which arrives decoded.
@router.get("/viewer/accession/{accession:path}", summary="Open the study of an accession number (EMR link)")
def viewer_accession(accession: str) -> RedirectResponse:
    # Resolved by the viewer after login (with the user's own access rights):
    # answering here, before any login, would let anyone map accession
    # numbers to studies.
    return RedirectResponse(f"/#/accession/{quote(accession, safe='')}", status_code=302)
