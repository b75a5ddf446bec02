"""``pacs serve``: the DICOM listener and the HTTP app in one supervised process.

Uvicorn owns the main thread and the signal handlers (SIGINT/SIGTERM stop it
gracefully; SIGHUP, ours, does the same); the DICOM server runs in its own
threads and is shut down after HTTP stops, then the index committer drains
and closes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any, TypeVar

import uvicorn

from . import tls
from .app import Pacs, freeze_startup_heap
from .audit import Event
from .dicom_net import set_keepalive
from .index.db import db_now
from .settings import Settings
from .timezones import hospital_zone, zone_is_unset_utc

log = logging.getLogger("pacs.serve")

T = TypeVar("T")

# Beyond this, log and audit times of this node visibly disagree with other nodes'.
CLOCK_SKEW_WARNING = 30.0


class ListenError(Exception):
    """A port the configuration names cannot be listened on."""


def _listen(what: str, option: str, host: str, port: int, start: Callable[[], T]) -> T:
    """*start()*, with a bind failure named by its port and the option that
    sets it: a bare "[Errno 98] Address already in use" leaves the operator
    guessing which of four ports is taken."""
    try:
        return start()
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        reason = {errno.EADDRINUSE: "is already in use by another program",
                  errno.EACCES: "needs privileges this user does not have",
                  errno.EADDRNOTAVAIL: "is not an address of this machine"}[exc.errno]
        raise ListenError(f"cannot listen for {what} on {host}:{port}: the "
                          f"{'address' if exc.errno == errno.EADDRNOTAVAIL else 'port'} {reason} "
                          f"(choose another with {option})") from None


def _probe(host: str, port: int) -> None:
    """Bind (host, port) as the listener will, and let go at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def check_ports(settings: Settings) -> None:
    """Raise :class:`ListenError` when a port the settings name cannot be
    listened on. Checked before the index is opened: a start that failed on
    a port in use (an older server without serve.lock still running) had
    already upgraded the index under that server, which then refused every
    C-STORE (0xA703) and answered HIS orders 500."""
    ports = [("HTTP", "--http-port / PACS_HTTP_PORT", settings.http_port),
             ("HL7 (MLLP)", "--hl7-port / PACS_HL7_PORT", settings.hl7_port)]
    if settings.dicom_plain:
        ports.append(("DICOM", "--dicom-port / PACS_DICOM_PORT", settings.dicom_port))
    if settings.dicom_tls_port:
        ports.append(("DICOM over TLS", "--dicom-tls-port / PACS_DICOM_TLS_PORT", settings.dicom_tls_port))
    for what, option, port in ports:
        try:
            _listen(what, option, settings.host, port, lambda: _probe(settings.host, port))  # noqa: B023
        except socket.gaierror as exc:
            raise ListenError(f"cannot listen on {settings.host!r}: not an address or known host name of this "
                              f"machine ({exc.strerror}); set --host / PACS_HOST") from None


def _start_ris_bridge(pacs: Pacs) -> tuple[Any, Any]:
    """The HL7 listener (orders, ADT) and, when a HIS is configured, the sender."""
    from pacs.orders import OrderService
    from ris_bridge import hl7v2
    from ris_bridge.mllp import MLLPServer
    from ris_bridge.outbound import OutboundSender

    from .addresses import Allowlist, is_loopback
    from .audit import Event

    settings = pacs.settings
    zone = hospital_zone(settings)  # HL7 times with an offset are read, and ACKs written, in it
    service = OrderService(pacs.engine, zone, order_status=settings.his_order_status,
                           prefetch=bool(settings.prefetch_sources))

    def answer(raw: bytes, peer: str) -> list[bytes]:
        return hl7v2.answers(service, raw, processing_id=settings.hl7_processing_id, peer=peer,
                             audit=pacs.audit.record, zone=zone)

    senders = Allowlist(settings.hl7_allowed_hosts)

    def allowed(peer: str) -> bool:
        if senders.allows(peer):
            return True
        log.warning("HL7 connection from %s refused: not in hl7_allowed_hosts", peer)
        pacs.audit.record(Event(action="hl7-connect", client=peer, protocol="hl7", outcome="denied",
                                detail="address not in hl7_allowed_hosts"))
        return False

    unknown = senders.check()
    if unknown:
        raise ValueError(f"hl7_allowed_hosts: not an address, network or known host name: {', '.join(unknown)}")
    if not senders and not is_loopback(settings.host):
        log.warning("HL7 (MLLP) is reachable from the network and takes patient updates and merges from any "
                    "address: set hl7_allowed_hosts (PACS_HL7_ALLOWED_HOSTS) to the HIS's addresses")
    listener = _listen("HL7 (MLLP)", "--hl7-port / PACS_HL7_PORT", settings.host, settings.hl7_port,
                       MLLPServer(settings.host, settings.hl7_port, answer, idle_timeout=settings.hl7_idle_timeout,
                                  allowed=allowed, frame_timeout=settings.hl7_frame_timeout,
                                  max_connections=settings.hl7_max_connections,
                                  max_per_host=settings.hl7_max_connections_per_host).start)
    sender = None
    if settings.his_mllp:
        host, _, port = settings.his_mllp.rpartition(":")
        sender = OutboundSender(pacs, host, int(port)).start()
        log.info("outbound HL7 to the HIS at %s", settings.his_mllp)
    return listener, sender


def _warn_clock_skew(pacs: Pacs) -> None:
    """One line when this node's clock is far from the index database's:
    shared claims and leases follow the database's clock, but received
    times, logs and audit records follow this one (set up NTP)."""
    try:
        with pacs.engine.connect() as conn:
            skew = (datetime.now(UTC) - db_now(conn)).total_seconds()
    except Exception as exc:  # a warning's check must not stop the start
        log.debug("clock check skipped: %s", exc)
        return
    if abs(skew) > CLOCK_SKEW_WARNING:
        log.warning("this server's clock is %.0f s %s the index database's: set up time synchronisation (NTP)",
                    abs(skew), "ahead of" if skew > 0 else "behind")


def _log_object_cache(pacs: Pacs) -> None:
    """Where a remote store's local copies are kept, and how much of them."""
    if not pacs.store.remote:
        return
    cache = getattr(pacs.store, "cache", None)
    if cache is None:
        log.info("S3 object cache off: every read needing a local file (a frame, a video range, a render) "
                 "downloads its whole object (s3_cache_bytes)")
        return
    log.info("S3 object cache at %s, at most %.1f GiB (s3_cache_bytes)", cache.root, cache.budget / 1024**3)


def _warn_open_dicom(pacs: Pacs) -> None:
    """Say at start when DICOM listens beyond this machine to any calling AE
    title: anyone on the network could then query, retrieve and store any
    patient's images (HL7's twin is in _start_ris_bridge)."""
    from .addresses import is_loopback

    settings = pacs.settings
    if is_loopback(settings.host) or not (settings.dicom_plain or settings.dicom_tls_port):
        return
    if not settings.ae_allowlist:
        log.warning("DICOM is reachable from the network and answers any calling AE title (C-FIND, C-MOVE, "
                    "C-GET and C-STORE of every patient): set ae_allowlist (PACS_AE_ALLOWLIST=true), register "
                    "each modality and workstation with `pacs ae add TITLE --host H --port P`, and ae_check_host "
                    "(PACS_AE_CHECK_HOST=true) so that a title is accepted only from its registered host")
    elif not any(ae.enabled for ae in pacs.aes.list()):
        log.warning("ae_allowlist is on and no AE is registered: every DICOM association is refused until one "
                    "is added with `pacs ae add TITLE --host H --port P`")


def _start_listeners(pacs: Pacs, dicom_ssl: Any, running: ExitStack) -> None:
    """DICOM (TLS, then plain: one process or worker processes) and HL7,
    each registered in *running* to be stopped."""
    from dicom_scp import start_dicom_server

    settings = pacs.settings
    _warn_open_dicom(pacs)
    if dicom_ssl is not None:
        tls_server = _listen(
            "DICOM over TLS", "--dicom-tls-port / PACS_DICOM_TLS_PORT", settings.host, settings.dicom_tls_port,
            lambda: start_dicom_server(pacs, port=settings.dicom_tls_port, ssl_context=dicom_ssl))
        running.callback(tls_server.shutdown)
        pacs.live.add_dicom(lambda: len(tls_server.active_associations))
        log.info("DICOM over TLS on %s:%d (client certificates %s)", settings.host, settings.dicom_tls_port,
                 "required" if settings.tls_require_client_cert else "not requested")
    workers = settings.dicom_workers or os.cpu_count() or 1
    dicom_option = "--dicom-port / PACS_DICOM_PORT"
    if settings.dicom_plain and workers > 1:
        from dicom_scp.workers import WorkerPool, open_listener

        listener = _listen("DICOM", dicom_option, settings.host, settings.dicom_port,
                           lambda: open_listener(settings.host, settings.dicom_port))
        pool = WorkerPool(settings, listener, workers).start()
        running.callback(pool.stop)
        pacs.live.add_dicom(pool.open_connections)
    elif settings.dicom_plain:
        plain = _listen("DICOM", dicom_option, settings.host, settings.dicom_port, lambda: start_dicom_server(pacs))
        running.callback(plain.shutdown)
        pacs.live.add_dicom(lambda: len(plain.active_associations))
    hl7_listener, sender = _start_ris_bridge(pacs)
    running.callback(hl7_listener.stop)
    if sender is not None:
        running.callback(sender.stop)


def _http_socket(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound here so that a taken port is reported
    like the others (uvicorn only logs it and exits 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit TCP keepalive: a viewer or EMR client
        # that vanished mid-request (wifi gone, laptop asleep: no FIN) is
        # closed in about two minutes instead of holding a descriptor for
        # good (uvicorn has no timeout for a request that never completes).
        set_keepalive(sock)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def proxy_header_kwargs(trusted_proxies: str) -> dict[str, Any]:
    """Uvicorn's proxy header options for ``trusted_proxies``: X-Forwarded-For
    and -Proto are believed from those addresses only, and not at all when
    none is set. Uvicorn's own default believes them from 127.0.0.1, so a
    local client (or anything a local process relays) could name any
    address it liked for the audit trail."""
    trusted = [entry.strip() for entry in trusted_proxies.split(",") if entry.strip()]
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": trusted}


def serve(settings: Settings, *, with_samples: bool = False) -> int:
    """Run until interrupted; returns the process exit code."""
    from viewer_api.app import create_app
    from viewer_api.protocol import header_deadline_protocol

    from .app import limit_malloc_arenas

    limit_malloc_arenas()

    from .running import hold_as_sole_server, hold_for_serving, share

    # A stop asked for while starting (the ports already answer, uvicorn's
    # own handlers are not in place yet) ended the process with SIGTERM's
    # default action: workers, committer and audit not closed, exit -15.
    # It is kept and handed to uvicorn, which then stops at once, cleanly.
    http_server: list[uvicorn.Server] = []
    stop_asked: list[int] = []

    def ask_stop(signum: int, _frame: object) -> None:
        stop_asked.append(signum)
        for started in http_server:
            started.should_exit = True

    # SIGHUP (a closing ssh session, `systemctl kill -s HUP`, a log rotation
    # script) is a stop too: its default action ended the process at once,
    # unlogged, with the same losses as above. Uvicorn leaves it to us.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, ask_stop)
    check_ports(settings)
    # Held until the process ends: `pacs restore` refuses to swap the index
    # meanwhile. Only the data dir's sole server upgrades an older index:
    # another one still running would fail on the upgraded schema.
    serving = hold_as_sole_server(settings.data_dir)
    if serving is not None:
        try:
            pacs = Pacs.open(settings, upgrade=True)
        finally:
            share(serving)
    else:
        serving = hold_for_serving(settings.data_dir)
        pacs = Pacs.open(settings, upgrade=True, others=f"another pacs serve runs on {settings.data_dir}")
    try:
        # TLS settings are checked before anything listens: a wrong path fails the start, not a modality.
        dicom_ssl = tls.dicom_server_context(settings, on_refused=lambda peer, reason, refused: pacs.audit.record(
            Event(action="denied" if refused else "tls-handshake", role="dicom", client=peer, protocol="dicom",
                  outcome="denied" if refused else "failure", detail=reason)))
        http_ssl = tls.uvicorn_ssl_kwargs(settings)
        tls.check_certificate_expiry(settings)
        scheme = "https" if http_ssl else "http"
        if zone_is_unset_utc(settings):
            # Containers and many servers run in UTC: every date and time we
            # write for the hospital would be 7 hours off in Vietnam.
            log.warning("the server's time zone is UTC and PACS_TIMEZONE is not set: DICOM dates and times "
                        "written here (report PDFs), HL7 timestamps, FHIR times and 'today' (purge, pull) "
                        "follow UTC; set timezone (PACS_TIMEZONE=Asia/Ho_Chi_Minh) to the hospital's zone")
        _warn_clock_skew(pacs)
        _log_object_cache(pacs)
        if not settings.public_url:
            log.warning("public_url (PACS_PUBLIC_URL) is not set: signed reports (PDF, ORU^R01) carry no link "
                        "to the images; set it to the address the EMR and HIS reach this server at")
        from .report_signature import needs_radiologist, seal_problem
        from .signing_keys import secret_problem

        if (problem := seal_problem(settings)) is not None:
            # Said at the start, not first to the radiologist whose report cannot be signed.
            log.warning("reports cannot be signed: %s", problem)
        if needs_radiologist(settings) and (problem := secret_problem(pacs.engine, settings)) is not None:
            # A node started without the cluster's signing secret (or a restore on a new machine).
            log.warning("reports cannot be signed with some radiologists' certificates: %s", problem)
        if pacs.reader.stats().studies == 0:
            if with_samples:
                from .samples import load_samples

                log.info("empty archive: loading synthetic sample studies")
                summary = load_samples(pacs)
                log.info("sample studies loaded: %d instances", summary.stored)
            elif settings.offer_samples:
                log.info(
                    "the archive is empty; to see data at once run: pacs samples --data-dir %s",
                    settings.data_dir,
                )
        if settings.auth_enabled:
            password = pacs.auth.ensure_admin()
            if password:
                # Shown once: a fresh install must be usable and never open.
                print(f"\n  First start: web viewer {scheme}://{settings.host}:{settings.http_port}/ "
                      f"user 'admin', password '{password}'\n  (change it: pacs user add admin --role admin "
                      f"--password ...)\n", flush=True)
        else:
            log.warning("HTTP access control is DISABLED (PACS_AUTH_ENABLED=false): local demo only")
        # Whatever started is stopped again, also when a later port is taken.
        with ExitStack() as running:
            from dicom_scp.commitment import release_owned

            # Last, once no N-ACTION can come: reports owed go back to the outbox.
            running.callback(release_owned, pacs)
            _start_listeners(pacs, dicom_ssl, running)
            http_socket = _listen("HTTP", "--http-port / PACS_HTTP_PORT", settings.host, settings.http_port,
                                  lambda: _http_socket(settings.host, settings.http_port))
            running.callback(http_socket.close)
            from .forwarding import Forwarder

            forwarder = Forwarder(
                pacs, max_attempts=settings.route_max_attempts, concurrency=settings.route_concurrency
            ).start()
            running.callback(forwarder.stop)
            from dicom_scp.commitment import CommitmentReporter

            running.callback(CommitmentReporter(pacs).start().stop)
            from .sweeper import Sweeper

            running.callback(Sweeper(pacs, interval=settings.tombstone_sweep_interval).start().stop)
            if settings.prefetch_sources:
                from .prefetch.worker import Prefetcher

                running.callback(Prefetcher(pacs).start().stop)
            if settings.worklist_images_stable_seconds:
                from .worklist_progress import WorklistProgress

                running.callback(WorklistProgress(pacs).start().stop)
            if settings.tls_cert is not None:
                running.callback(tls.CertificateExpiryWatch(settings).start().stop)
            freeze_startup_heap()
            config = uvicorn.Config(
                create_app(pacs),
                log_level=settings.log_level.lower(),
                access_log=False,
                **proxy_header_kwargs(settings.trusted_proxies),
                timeout_graceful_shutdown=10,
                http=header_deadline_protocol(settings.http_header_timeout, settings.http_body_stall_timeout,
                                              settings.dicom_timeout),
                **http_ssl,
            )
            log.info("HTTP listening on %s://%s:%d", scheme, settings.host, settings.http_port)
            # Uvicorn re-raises the signal that stopped it once it has shut
            # down; with ask_stop in place that lands here harmlessly and the
            # DICOM listener and the committer are closed properly.
            http_server.append(uvicorn.Server(config))
            http_server[0].should_exit = bool(stop_asked)
            http_server[0].run(sockets=[http_socket])
            if stop_asked:
                log.info("stopping on %s", signal.Signals(stop_asked[0]).name)
            else:
                log.info("stopping")
    finally:
        pacs.close()
        serving.close()
    return 0
