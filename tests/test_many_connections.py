"""A node holding more than a thousand connections (idle HTTP clients, a
flood) gives new sockets descriptors numbered 1024 and up. pynetdicom's
select() refuses those: every association on one died at its first read
("Peer aborted Association") until the connections went. Associations now
wait on their sockets with poll()."""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path

from pydicom import dcmread

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import run_dcmtk, wait_until
from .test_query_retrieve import StoreSCP, _movescu

HELD = 1100


def test_associations_work_on_descriptors_above_1024(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if soft < wanted:
        # The server inherits it; raising the hard limit needs root, as CI has.
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_HTTP_HEADER_TIMEOUT": "300"}).start()
    held: list[socket.socket] = []
    try:
        for _ in range(HELD):
            held.append(socket.create_connection(("127.0.0.1", server.http_port)))
        assert server.proc is not None
        fds = Path(f"/proc/{server.proc.pid}/fd")
        assert wait_until(lambda: len(os.listdir(fds)) > HELD, timeout=60), "the server did not take the connections"
        echo = run_dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
        assert echo.returncode == 0, echo.stdout + echo.stderr + server.log_text()[-3000:]
        ct = make_ct(tmp_path / "ct.dcm")
        sent = server.storescu(str(ct))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert server.stats()["instances"] == 1
        # The server calling out (a C-MOVE's sub-operations) on such a descriptor too.
        scp = StoreSCP(tmp_path / "dest", accept_all=True)
        try:
            server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
            study = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
            moved = _movescu(server, "STUDY", {"StudyInstanceUID": study})
            assert "Final Move Response (Success)" in moved.stderr, moved.stderr + server.log_text()[-2000:]
        finally:
            scp.stop()
        assert len(scp.received()) == 1
    finally:
        for s in held:
            s.close()
        server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
