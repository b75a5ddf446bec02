"""The roles of the HTTP API's users (one per user; see README "Access control").

A module of its own, free of imports, so that the command line can offer
them without loading the authentication code."""

# monitor: a monitoring system (Prometheus, Zabbix): GET /metrics and /health only.
ROLES = ("modality", "radiologist", "referring", "emr", "his", "admin", "monitor")

# The roles whose rejection notes (IHE IOCM), stored over STOW-RS, withdraw
# the images they list (pacs.rejections); over DICOM, an AE granted
# "reject" by name. Images deleted by a note any modality's token may send
# would be an easy way to lose records.
REJECTING_ROLES = ("admin",)
