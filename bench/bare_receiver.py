"""A bare pynetdicom C-STORE receiver: writes the received bytes to files.

The reference point of ``bench/ingest``: everything our server adds
(header parsing, durability, indexing) is measured against this.
Run: python bench/bare_receiver.py OUT_DIR PORT [--max-pdu N]
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dicom_scp.contexts import STORAGE_TRANSFER_SYNTAXES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--max-pdu", type=int, default=262_144)
    parser.add_argument("--event-driven", action="store_true",
                        help="with dicom_scp.reactor's waiting instead of pynetdicom's polling")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        path = args.out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with path.open("wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    def on_open(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.event_driven:
            from dicom_scp.reactor import event_driven

            event_driven(event.assoc)

    ae = AE(ae_title="BARE")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = args.max_pdu
    ae.start_server(
        ("127.0.0.1", args.port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)],
    )


if __name__ == "__main__":
    main()
