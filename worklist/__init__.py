"""Worklist: Modality Worklist C-FIND SCP and MPPS from HIS orders (lands with its issue)."""
