"""RIS bridge: HL7 v2 over MLLP and JSON/FHIR links to HIS/RIS/EMR (lands with its issue)."""
