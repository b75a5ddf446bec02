"""Monitoring: the Prometheus figures GET /metrics answers (see README,
"Monitoring"). :mod:`.service` puts them together, :mod:`.index_figures`
and :mod:`.counters` read the shared index, :mod:`.live` holds this node's
own sources, :mod:`.exposition` writes the text format."""
