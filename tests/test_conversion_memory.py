"""The process's bound on decoded pixels held at once by conversions
(pacs.pixel_memory, ``conversion_memory_bytes``), against a running
`pacs serve` over real sockets (issue 9, scenario 8).

Eight clients converting a tomosynthesis of 17 MB frames took the server to
450-635 MB: each response held the frame it sent, and WADO-RS frames also
kept their first frame to the end of the response. Every decoded frame now
holds a share of one budget from its decode until it is written out; the
server's ``/health`` reports the bytes held now and the most held at once.

The object here is small (frames of 2 MB decoded) and so are the budgets,
so that the bound is reached in a few seconds."""

from __future__ import annotations

import concurrent.futures
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from .conftest import Backend, PacsServer
from .peers import wait_until
from .test_dicomweb_more import _parts
from .test_multiframe_review import _jpeg_ls, _pixels, _url

MB = 1 << 20
SIDE = 1024
# 16-bit samples: 2 MB per frame decoded, more than one piece sent (pacs.pixel_memory.CHUNK).
FRAME_BYTES = SIDE * SIDE * 2


def _socket_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to (net.ipv4.tcp_wmem)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * MB


# A client that stops reading leaves the server holding a frame only when the
# answer is more than the kernel's send buffer takes: frames enough for that.
FRAMES = max(3, -(-(_socket_buffer_max() + 4 * MB) // FRAME_BYTES))
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"'
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"'
# Two decoded frames fit at once, three do not.
BUDGET = 5 * MB
# Smaller than one frame: that frame is converted alone.
SMALL_BUDGET = 1 * MB
SHORT_WAIT = 2.0


class Archive:
    """A server with a budget, and the JPEG-LS object it holds."""

    def __init__(self, server: PacsServer, ds: Dataset, pixels: np.ndarray) -> None:
        self.server, self.ds, self.pixels = server, ds, pixels

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.server.http_port}",
                            headers=self.server.auth_headers, timeout=120)

    def memory(self) -> dict[str, int]:
        """What /health says of the conversions' pixel budget."""
        with self.http() as http:
            return http.get("/health").json()["conversion_memory"]  # type: ignore[no-any-return]

    def frames_url(self) -> str:
        return _url(self.ds) + "/frames/" + ",".join(str(n) for n in range(1, FRAMES + 1))

    def frames(self) -> list[bytes]:
        """Every frame, decoded."""
        with self.http() as http:
            return [body for _, body in _parts(http.get(self.frames_url(), headers={"Accept": FRAMES_ACCEPT}))]


def _archive(tmp: Path, budget: int, wait: float) -> Iterator[Archive]:
    inbox = tmp / "in"
    inbox.mkdir()
    pixels = _pixels(FRAMES, SIDE, 7)
    ds = _jpeg_ls(inbox / "jls.dcm", pixels)
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_CONVERSION_MEMORY_BYTES": str(budget),
                                   "PACS_CONVERSION_WAIT_SECONDS": str(wait)})
    server.cli("import", str(inbox))
    server.start()
    try:
        yield Archive(server, ds, pixels)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    yield from _archive(tmp_path_factory.mktemp("pixel-budget"), BUDGET, 60.0)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """A budget smaller than one frame, and a short wait."""
    yield from _archive(tmp_path_factory.mktemp("pixel-budget-tight"), SMALL_BUDGET, SHORT_WAIT)


def _stalled(archive: Archive, url: str, accept: str = FRAMES_ACCEPT) -> socket.socket:
    """A client that asks for *url* (decoded pixels), reads the status line
    and then nothing more (a tiny receive window): the server is left
    holding the frame it is sending."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", archive.server.http_port))
    headers = {**archive.server.auth_headers, "Host": "127.0.0.1", "Accept": accept}
    request = f"GET {url} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(request.encode())
    head = sock.recv(64)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_conversions_at_once_hold_no_more_than_the_budget(archive: Archive) -> None:
    """Clients at once taking the object's frames decoded, the instance
    decoded (Explicit VR Little Endian) and recoded (JPEG 2000), and
    rendered frames all get every pixel, while the decoded frames held at
    once in the server never pass the budget (two frames of 2 MB)."""
    expected = [archive.pixels[n].tobytes() for n in range(FRAMES)]

    def frames(_: int) -> bool:
        return archive.frames() == expected

    def instance(target: str) -> bool:
        accept = INSTANCE_ACCEPT + (f"; transfer-syntax={target}" if target else "")
        with archive.http() as http:
            ((_, body),) = _parts(http.get(_url(archive.ds), headers={"Accept": accept}))
        got = dcmread(io.BytesIO(body))
        return bool(np.array_equal(got.pixel_array, archive.pixels))

    def rendered(n: int) -> bool:
        with archive.http() as http:
            response = http.get(f"{_url(archive.ds)}/frames/{n}/rendered", headers={"Accept": "image/png"})
        return response.status_code == 200 and response.content.startswith(b"\x89PNG")

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        jobs = [pool.submit(frames, i) for i in range(3)]
        jobs += [pool.submit(instance, target) for target in ("", JPEG2000Lossless)]
        jobs += [pool.submit(rendered, n) for n in (1, 2)]
        assert all(job.result() for job in jobs), "pixels changed"
    memory = archive.memory()
    assert FRAME_BYTES <= memory["peak"] <= BUDGET, memory
    assert memory["in_use"] == 0 and memory["waiting"] == 0, memory


@pytest.mark.parametrize("what", ["frames", "instance"])
def test_a_client_gone_midway_gives_its_share_back(archive: Archive, what: str) -> None:
    """A client that stops reading (WADO-RS frames decoded, or the instance
    decoded to Explicit VR Little Endian) holds its frame's share: the next
    conversion waits for it; once it disconnects midway the share is given
    back and the waiting conversion goes on."""
    if what == "frames":
        sock = _stalled(archive, archive.frames_url())
    else:
        sock = _stalled(archive, _url(archive.ds), INSTANCE_ACCEPT)
    # A second stalled client holds the other frame that fits: a third must
    # wait until one of them is gone (two clients that read could take turns
    # beside the first and never be seen waiting).
    other = None
    try:
        assert wait_until(lambda: archive.memory()["in_use"] >= FRAME_BYTES, timeout=30, interval=0.1)
        other = _stalled(archive, archive.frames_url())
        assert wait_until(lambda: archive.memory()["in_use"] >= 2 * FRAME_BYTES, timeout=30, interval=0.1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            later = pool.submit(archive.frames)
            assert wait_until(lambda: archive.memory()["waiting"] >= 1, timeout=30, interval=0.1), archive.memory()
            assert not later.done()
            sock.close()
            assert later.result() == [archive.pixels[n].tobytes() for n in range(FRAMES)]
    finally:
        sock.close()
        if other is not None:
            other.close()
    assert wait_until(lambda: archive.memory()["in_use"] == 0, timeout=30, interval=0.1), archive.memory()


def test_a_frame_larger_than_the_whole_budget_is_converted_alone(tight: Archive) -> None:
    """Frames of 2 MB under a 1 MB budget: each is still served (alone)."""
    assert tight.frames() == [tight.pixels[n].tobytes() for n in range(FRAMES)]
    memory = tight.memory()
    assert memory["peak"] == FRAME_BYTES and memory["in_use"] == 0, memory


def test_waiting_past_the_limit_is_a_503_with_retry_after(tight: Archive) -> None:
    """While a client that stopped reading holds the budget, a conversion
    waits the configured time and is then refused: 503, Retry-After, a
    reason; the same request goes through once that client is gone."""
    sock = _stalled(tight, tight.frames_url())
    try:
        assert wait_until(lambda: tight.memory()["in_use"] >= FRAME_BYTES, timeout=30, interval=0.1)
        refused = tight.memory()["refused"]
        with tight.http() as http:
            response = http.get(_url(tight.ds) + "/frames/2", headers={"Accept": FRAMES_ACCEPT})
        assert response.status_code == 503, response.text[:300]
        assert int(response.headers["retry-after"]) > 0
        assert "busy converting" in response.json()["error"]
        assert tight.memory()["refused"] == refused + 1
    finally:
        sock.close()
    assert wait_until(lambda: tight.memory()["in_use"] == 0, timeout=30, interval=0.1), tight.memory()
    with tight.http() as http:
        ((_, body),) = _parts(http.get(_url(tight.ds) + "/frames/2", headers={"Accept": FRAMES_ACCEPT}))
    assert body == tight.pixels[1].tobytes()
