"""``pacs serve``: the DICOM listener and the HTTP app in one supervised process.

Uvicorn owns the main thread and the signal handlers (SIGINT/SIGTERM stop it
gracefully); the DICOM server runs in its own threads and is shut down after
HTTP stops, then the index committer drains and closes.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import uvicorn

from . import tls
from .app import Pacs, freeze_startup_heap
from .audit import Event
from .settings import Settings

log = logging.getLogger("pacs.serve")


def _start_ris_bridge(pacs: Pacs) -> tuple[Any, Any]:
    """The HL7 listener (orders, ADT) and, when a HIS is configured, the sender."""
    from pacs.orders import OrderService
    from ris_bridge import hl7v2
    from ris_bridge.mllp import MLLPServer
    from ris_bridge.outbound import OutboundSender

    service = OrderService(pacs.engine)
    settings = pacs.settings
    listener = MLLPServer(settings.host, settings.hl7_port, lambda raw: hl7v2.handle(service, raw),
                          idle_timeout=settings.hl7_idle_timeout).start()
    sender = None
    if settings.his_mllp:
        host, _, port = settings.his_mllp.rpartition(":")
        sender = OutboundSender(pacs, host, int(port)).start()
        log.info("outbound HL7 to the HIS at %s", settings.his_mllp)
    return listener, sender


def serve(settings: Settings, *, with_samples: bool = False) -> int:
    """Run until interrupted; returns the process exit code."""
    from dicom_scp import start_dicom_server
    from viewer_api.app import create_app

    pacs = Pacs.open(settings)
    try:
        # TLS settings are checked before anything listens: a wrong path fails the start, not a modality.
        dicom_ssl = tls.dicom_server_context(settings, on_refused=lambda peer, reason: pacs.audit.record(
            Event(action="denied", role="dicom", client=peer, protocol="dicom", outcome="denied", detail=reason)))
        http_ssl = tls.uvicorn_ssl_kwargs(settings)
        scheme = "https" if http_ssl else "http"
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
        # The TLS listener first: if its port is taken, nothing is left listening half-configured.
        dicom_servers: list[Any] = []
        if dicom_ssl is not None:
            dicom_servers.append(start_dicom_server(pacs, port=settings.dicom_tls_port, ssl_context=dicom_ssl))
            log.info("DICOM over TLS on %s:%d (client certificates %s)", settings.host, settings.dicom_tls_port,
                     "required" if settings.tls_require_client_cert else "not requested")
        workers = settings.dicom_workers or os.cpu_count() or 1
        pool = None
        if settings.dicom_plain and workers > 1:
            from dicom_scp.workers import WorkerPool, open_listener

            pool = WorkerPool(settings, open_listener(settings.host, settings.dicom_port), workers).start()
        elif settings.dicom_plain:
            dicom_servers.append(start_dicom_server(pacs))
        hl7_listener, sender = _start_ris_bridge(pacs)
        from .forwarding import Forwarder

        forwarder = Forwarder(
            pacs, max_attempts=settings.route_max_attempts, concurrency=settings.route_concurrency
        ).start()
        freeze_startup_heap()
        try:
            config = uvicorn.Config(
                create_app(pacs),
                host=settings.host,
                port=settings.http_port,
                log_level=settings.log_level.lower(),
                access_log=False,
                timeout_graceful_shutdown=10,
                **http_ssl,
            )
            log.info("HTTP listening on %s://%s:%d", scheme, settings.host, settings.http_port)
            # Uvicorn re-raises the signal that stopped it once it has shut
            # down; with a no-op handler in place that lands here harmlessly
            # and the DICOM listener and the committer are closed properly.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: None)
            uvicorn.Server(config).run()
            log.info("stopping")
        finally:
            forwarder.stop()
            if pool is not None:
                pool.stop()
            for dicom in dicom_servers:
                dicom.shutdown()
            hl7_listener.stop()
            if sender is not None:
                sender.stop()
    finally:
        pacs.close()
    return 0
