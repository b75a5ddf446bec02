"""The association server: each association set up in the accepting thread.

pynetdicom's ThreadedAssociationServer starts a thread per connection only to
build the Association object and start *its* thread (which starts the DUL
thread): three thread starts and their GIL hand-offs before the
A-ASSOCIATE-RQ is even read, ~0.5 ms of a ~2 ms association set-up on the
test machine (Orthanc answers in ~0.1 ms). Building the Association where the
connection is accepted leaves two threads per association, as before minus
the short-lived one. Nothing that waits on the peer runs there: the TLS
handshake is deferred to the first read (:mod:`pacs.tls`), the handlers bound
to EVT_CONN_OPEN only configure the socket and the association, and the
A-ASSOCIATE-RQ is read and negotiated in the association's own threads.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer


class InlineAssociationServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` without the per-connection thread."""

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        # On an exception, socketserver's _handle_request_noblock logs it
        # and closes the connection, as the per-connection thread did.
        self.finish_request(request, client_address)
