"""Reviewer findings on the Q/R retrieve services (C-MOVE / C-GET), each
against a real `pacs serve` over real sockets:

1. a cancelled C-GET whose peer refused a sub-operation lists that
   instance in the Failed SOP Instance UID List of its 0xFE00 response
   (PS3.4 C.4.3.3.1): the list held only the instances the archive could
   not give in any accepted syntax, so the response said "1 failed" beside
   an empty list and the requester could not tell which to ask for again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet

from .conftest import Backend, PacsServer
from .qr_corpus import import_corpus, sop_uid, study_uid

GET = StudyRootQueryRetrieveInformationModelGet
OUT_OF_RESOURCES, CANCEL = 0xA700, 0xFE00


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """The known Q/R corpus (study S1: two CT images, then one MR image)."""
    tmp = tmp_path_factory.mktemp("review-dimse")
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}))
    import_corpus(server, tmp / "corpus")
    server.start()
    yield server
    server.stop()


def test_cancelled_get_lists_the_sub_operations_the_peer_refused(archive: PacsServer) -> None:
    """The requester refuses the first C-STORE (0xA700), then cancels the
    C-GET while it stores the second: the final 0xFE00 counts one failed
    and names it."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 1:
            return OUT_OF_RESOURCES
        if len(received) == 2:
            # Written before this store's response: the archive reads the
            # cancel before it goes on to the third instance.
            event.assoc.send_c_cancel(1, query_model=GET)
        return 0x0000

    ae = AE("GETCANCEL")
    ae.add_requested_context(GET)
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class)
    roles = [build_role(sop_class, scp_role=True) for sop_class in (CTImageStorage, MRImageStorage)]
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid("S1")
    try:
        responses = [(status, found) for status, found in assoc.send_c_get(identifier, GET) if status]
    finally:
        assoc.release()
    status, found = responses[-1]
    assert (int(status.Status), int(status.NumberOfFailedSuboperations),
            int(status.NumberOfCompletedSuboperations)) == (CANCEL, 1, 1)
    # In the order the archive sends them (the import stores the corpus in parallel: not its file order).
    study = {sop_uid("S1", series, n) for series, n in ((0, 0), (0, 1), (1, 0))}
    assert len(received) == 2 and set(received) <= study, received
    assert found is not None
    assert list(_uids(found.get("FailedSOPInstanceUIDList"))) == received[:1]


def _uids(value: Any) -> Iterator[str]:
    if not value:
        return iter(())
    return iter([str(value)] if isinstance(value, str) else [str(v) for v in value])

