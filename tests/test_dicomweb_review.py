"""DICOMweb as third-party clients and reverse proxies use it (review of
2026-12-05): links in answers follow the Host the client sent, and bulk
data is negotiated like every other resource."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import dcmread

from .conftest import Backend, PacsServer, pydicom_file


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("web-review")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    inbox = tmp / "in"
    inbox.mkdir()
    for name in ("CT_small.dcm", "waveform_ecg.dcm"):
        (inbox / name).write_bytes(pydicom_file(name).read_bytes())
    server.cli("import", str(inbox))
    server.start()
    yield server
    server.stop()


def _instance_url(name: str) -> str:
    ds = dcmread(pydicom_file(name), stop_before_pixels=True)
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def test_links_follow_a_host_header_without_a_port(web: PacsServer) -> None:
    """A reverse proxy on 80/443 passing ``Host $host`` (nginx's usual
    config) sends no port: links must point at it (RFC 9110 7.2, the
    scheme's default port), not at our own listening port behind it,
    which the client cannot reach."""
    ct = dcmread(pydicom_file("CT_small.dcm"), stop_before_pixels=True)
    with web.http() as http:
        for host, base in (("pacs.hospital.vn", "http://pacs.hospital.vn/dicom-web"),
                           ("pacs.hospital.vn:8443", "http://pacs.hospital.vn:8443/dicom-web")):
            found = http.get("/dicom-web/studies", params={"StudyInstanceUID": ct.StudyInstanceUID},
                             headers={"Host": host})
            assert found.status_code == 200, found.text
            assert found.json()[0]["00081190"]["Value"] == [f"{base}/studies/{ct.StudyInstanceUID}"]
            meta = http.get(_instance_url("CT_small.dcm") + "/metadata", headers={"Host": host}).json()[0]
            assert meta["7FE00010"]["BulkDataURI"].startswith(f"{base}/studies/{ct.StudyInstanceUID}/")


def test_bulk_data_is_negotiated(web: PacsServer) -> None:
    """A bulk data value is octets in multipart/related: a client accepting
    only JPEG parts gets a 406, not octets under a type it refused."""
    ecg = dcmread(pydicom_file("waveform_ecg.dcm"))
    url = _instance_url("waveform_ecg.dcm") + "/bulk/54000100/0/54001010"
    with web.http() as http:
        refused = http.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'})
        assert refused.status_code == 406, refused.text
        for accept in ('multipart/related; type="application/octet-stream"',
                       'multipart/related; type="application/octet-stream"; transfer-syntax=*', "*/*", None):
            answer = http.get(url, headers={"Accept": accept} if accept else {})
            assert answer.status_code == 200, (accept, answer.text)
            assert "application/octet-stream" in answer.headers["content-type"]
            assert ecg.WaveformSequence[0].WaveformData in answer.content
