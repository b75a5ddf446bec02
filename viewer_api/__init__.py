"""HTTP entry point: DICOMweb, WADO-URI, rendering, FHIR, JSON API, viewer."""
