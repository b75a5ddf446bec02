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
    NAME,
    archive,  # noqa: F401 (the fixture)
    make_order_link,
    new_accession,
    new_patient_id,
    opened,
    path_of,
    place_order,
    send_study,
    token_of,
)

OTHER_NAME = "Lê^Văn Khác"
OTHER_BIRTH_DATE = "19600505"


class OrderMover:
    """The HIS moving the order *accession* to the other patient and back
    (ORM^O01 ORC XO over MLLP), over and over, in a thread, while a test
    reads it: a registration made on the wrong patient, corrected. With
    *settle*, each move waits until that many of the test's requests begun
    after it have been answered (:meth:`answered`): no request then sees
    the order leave a patient and come back to it."""

    def __init__(self, server: PacsServer, accession: str, patient_id: str, other_patient_id: str,
                 settle: int = 0) -> None:
        self.server, self.accession, self.settle = server, accession, settle
        self.patients = (patient_id, other_patient_id)
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.done = 0
        self.changed = threading.Condition()

    def answered(self) -> None:
        """One of the test's requests was answered."""
        with self.changed:
            self.done += 1
            self.changed.notify_all()

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
                with self.changed:
                    # One request may be under way since before the move: it and `settle` more.
                    until = self.done + 1 + self.settle if self.settle else 0
                    self.changed.wait_for(lambda: self.done >= until or self.stop.is_set())
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            self.failures.append(exc)

    def __enter__(self) -> OrderMover:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        with self.changed:
            self.stop.set()
            self.changed.notify_all()
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


def test_an_order_moved_while_the_page_reads_it_shows_nothing_of_the_other_patient(archive: PacsServer) -> None:
    """The browser's birth-year cookie was judged when the page's data was
    asked for, and the order's patient, name and studies read afterwards:
    an HIS ORC XO moving the order (and so its study) to another patient
    between the two answered that patient's name to the browser that had
    answered only the first patient's year (one request in fifty or so
    while the HIS sent XO after XO). Now the link is read again once the
    data is, and the cookie judged again: a 403 asking the birth year."""
    acc, pid, other_pid = new_accession("RX"), new_patient_id(), new_patient_id()
    place_order(archive, acc, pid)
    base = path_of(make_order_link(archive, acc))
    for _ in range(3):  # three exams on the order: the page's data takes longer to read
        send_study(archive, accession=acc, patient_id=pid, slices=1)
    shown: dict[int, int] = {}
    leaked = []
    with patient(archive) as phone:
        assert opened(phone, base)["patient_name"] == NAME  # the first patient's year answered
        with OrderMover(archive, acc, pid, other_pid, settle=1) as his:
            for _ in range(600):
                answer = phone.get(f"{base}/study")
                his.answered()
                shown[answer.status_code] = shown.get(answer.status_code, 0) + 1
                if answer.status_code == 200:
                    data = answer.json()
                    names = {data["patient_name"], *(s["patient_name"] for s in data["studies"])}
                    if names != {NAME}:
                        leaked.append(names)
                else:
                    assert answer.status_code == 403 and answer.json()["birth_year_required"], answer.text
    assert shown.get(200) and shown.get(403), shown  # the order was read under both patients
    assert leaked == [], f"{len(leaked)} answers of {sum(shown.values())} showed {leaked}"
