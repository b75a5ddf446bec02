"""Prefetch of prior studies: when the HIS places an order, the patient's
earlier studies are fetched from the old PACS before the examination.

- :mod:`.jobs`: the durable queue (``prefetch_jobs``): queued with the order,
  claimed under a lease so that one node of a cluster runs a job, retried
  with backoff, dead after ``prefetch_max_attempts`` tries;
- :mod:`.run`: one job: C-FIND of each source for the patient (each of its
  identifiers), the priors chosen (date, modality, newest first, the limit)
  and made complete here through :class:`pacs.pull.Puller`, as `pacs remote
  pull` does: retrieved objects go through the normal ingest and take no
  routing rule;
- :mod:`.filing`: a prior the old PACS filed under the patient's citizen ID
  alone, filed under the order's patient once it is complete here;
- :mod:`.worker`: the background worker of `pacs serve`.
"""
