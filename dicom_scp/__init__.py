"""DIMSE services over pynetdicom: C-ECHO, C-STORE (and Q/R as it lands)."""

from .server import build_ae, start_dicom_server

__all__ = ["build_ae", "start_dicom_server"]
