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

import logging
import socket
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

# At a stop, seconds the open associations get to end by themselves (the
# last images of a series, a query) before they are aborted.
STOP_GRACE_SECONDS = 5.0
# Then, seconds an aborted association gets to finish the operation it was
# in (an object received whole is stored and indexed, unanswered).
ABORTED_WAIT_SECONDS = 15.0


class InlineAssociationServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` without the per-connection thread."""

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        # On an exception, socketserver's _handle_request_noblock logs it
        # and closes the connection, as the per-connection thread did.
        self.finish_request(request, client_address)

    def shutdown(self) -> None:
        """Stop accepting, then end the open associations before returning.

        pynetdicom's shutdown leaves them running: `pacs serve` (and each
        DICOM worker) then closed the index under them, and a modality
        still sending had every further C-STORE refused 0xA703 (index
        committer shut down), each object left in the store unindexed,
        until it had sent the whole study. Now they get a few seconds to
        end, then an A-ABORT (the modality sends the rest again later), and
        the operation in progress is let finish while the index is open.
        """
        super().shutdown()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self.active_associations
        if remaining:
            log.info("stopping: aborting %d open DICOM association(s)", len(remaining))
        for assoc in remaining:
            try:
                assoc.abort()
            except Exception as exc:  # one that ends meanwhile must not stop the others' abort
                log.debug("abort of an association at stop: %s", exc)
        deadline = time.monotonic() + ABORTED_WAIT_SECONDS
        for assoc in remaining:
            assoc.join(max(0.0, deadline - time.monotonic()))
