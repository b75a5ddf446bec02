"""The pixel budget itself (pacs.pixel_memory), in one process: who waits,
in which order, and what is given back. The server's use of it is in
tests/test_conversion_memory.py."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from pacs.pixel_memory import Lease, PixelMemory, PixelMemoryBusy, held_pieces

from .peers import wait_until


def _waiting(memory: PixelMemory, count: int) -> bool:
    return wait_until(lambda: memory.stats()["waiting"] == count, timeout=10, interval=0.01)


def _in_thread(take: Callable[[], Lease], got: list[str], tag: str) -> threading.Thread:
    """*take* in a thread of its own; *tag* added to *got* once it has its lease
    (given back at once), or "<tag> busy" when it was refused."""

    def run() -> None:
        try:
            take().release()
            got.append(tag)
        except PixelMemoryBusy:
            got.append(f"{tag} busy")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_waiters_are_served_in_order_and_a_frame_bigger_than_the_budget_alone() -> None:
    memory = PixelMemory(100, 60)
    held = memory.lease(60)
    got: list[str] = []
    big = _in_thread(lambda: memory.lease(500), got, "big")
    assert _waiting(memory, 1)
    # Would fit beside the 60 held, but the bigger one came first.
    small = _in_thread(lambda: memory.lease(10), got, "small")
    assert _waiting(memory, 2)
    held.release()
    big.join()
    small.join()
    stats = memory.stats()
    assert got == ["big", "small"]
    assert stats["peak"] == 500 and stats["in_use"] == 0 and stats["waited"] == 2


def test_a_refused_waiter_leaves_the_others_in_line() -> None:
    """Two waiting for as many bytes: the one refused after its shorter wait
    takes its own place out of the line, not the other's."""
    memory = PixelMemory(100, 10)
    held = memory.lease(90)
    got: list[str] = []
    patient = _in_thread(lambda: memory.lease(50), got, "patient")
    assert _waiting(memory, 1)
    memory.wait_seconds = 0.1
    impatient = _in_thread(lambda: memory.lease(50), got, "impatient")
    impatient.join()
    assert got == ["impatient busy"] and memory.stats()["waiting"] == 1
    held.release()
    patient.join()
    assert got == ["impatient busy", "patient"] and memory.stats()["refused"] == 1


def test_a_lease_is_given_back_once_and_by_its_pieces() -> None:
    memory = PixelMemory(100, 0.1)
    lease = memory.lease(80)
    lease.resize(30)  # encoded: smaller
    assert memory.stats()["in_use"] == 30
    lease.release()
    lease.release()
    assert memory.stats()["in_use"] == 0
    # A body abandoned after its first piece gives its frame's lease back.
    pieces = held_pieces(bytes(3 << 20), memory.lease(70))
    next(pieces)
    assert memory.stats()["in_use"] == 70
    pieces.close()
    assert memory.stats()["in_use"] == 0
    # One never started (a response dropped before its body): when it is collected.
    unstarted = held_pieces(bytes(10), memory.lease(70))
    del unstarted
    assert memory.stats()["in_use"] == 0


def test_one_holder_never_waits_for_itself() -> None:
    """A routing batch prepares its copies before sending the first: the
    leases it holds count, but it does not wait (for itself) for more."""
    memory = PixelMemory(100, 0.1)
    with memory.one_holder():
        first, second = memory.lease(80), memory.lease(80)
        assert memory.stats()["in_use"] == 160
        with pytest.raises(PixelMemoryBusy):
            _other_thread_lease(memory, 10)
        first.release()
        second.release()
    assert memory.stats()["in_use"] == 0


def _other_thread_lease(memory: PixelMemory, nbytes: int) -> None:
    """A lease taken in another thread (not the holder): raises what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            memory.lease(nbytes).release()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
