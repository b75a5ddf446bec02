"""Review of the share links made for an order before the scan
(pacs.share_orders, POST /api/orders/{accession}/shares, the patient's page
viewer_api.share_page): what a phone sees while the HIS moves the order.
Against a real `pacs serve` (HL7 over MLLP, DCMTK storescu; SQLite + files
and PostgreSQL + SeaweedFS), the archive of tests/test_share_orders.py."""

from __future__ import annotations

import threading

from .conftest import PacsServer
from .test_share_links import patient
from .test_share_orders import (
    archive,  # noqa: F401 (the fixture)
    make_order_link,
    new_accession,
    new_patient_id,
    path_of,
    place_order,
    token_of,
)

OTHER_NAME = "Lê^Văn Khác"
OTHER_BIRTH_DATE = "19600505"


class OrderMover:
    """The HIS moving the order *accession* to the other patient and back
    (ORM^O01 ORC XO over MLLP), over and over, in a thread, while a test
    reads it: a registration made on the wrong patient, corrected."""

    def __init__(self, server: PacsServer, accession: str, patient_id: str, other_patient_id: str) -> None:
        self.server, self.accession = server, accession
        self.patients = (patient_id, other_patient_id)
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            moves = 0
            while not self.stop.is_set():
                moves += 1
                if moves % 2:
                    place_order(self.server, self.accession, self.patients[1], name=OTHER_NAME,
                                birth_date=OTHER_BIRTH_DATE, control="XO")
                else:
                    place_order(self.server, self.accession, self.patients[0], control="XO")
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            self.failures.append(exc)

    def __enter__(self) -> OrderMover:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        assert not self.failures, self.failures


def test_the_order_links_listed_while_the_his_moves_the_order(archive: PacsServer) -> None:
    """A link's order status was read in two statements (the link's order
    row, then its accession's rows keyed by patient): on PostgreSQL an XO
    moving the order to another patient committed between them, and the
    first row's key was not among the second's rows: a KeyError, a 500 to
    the HIS listing the links, to `pacs share list` and to the patient
    opening the page. Now both are one statement."""
    acc, pid, other_pid = new_accession("RL"), new_patient_id(), new_patient_id()
    place_order(archive, acc, pid)
    link = make_order_link(archive, acc)
    answers: dict[int, int] = {}
    with archive.http(token=token_of(archive, "his")) as his, patient(archive) as phone:
        with OrderMover(archive, acc, pid, other_pid):
            for _ in range(150):
                for answer in (his.get(f"/api/orders/{acc}/shares"), phone.get(path_of(link))):
                    answers[answer.status_code] = answers.get(answer.status_code, 0) + 1
    assert answers == {200: 300}, answers

