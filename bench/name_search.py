"""Any-word patient name search at archive size: the radiologist's study list
(pacs.studylist.study_list, the fuzzy matching QIDO-RS fuzzymatching=true
uses too) on the synthetic archive (bench/synthetic.py), timed in-process.

    .venv/bin/python -m bench.name_search                      # SQLite, 100,000 studies
    .venv/bin/python -m bench.name_search --dbs sqlite,pg --calls 20

Prints per term: the median and p95 milliseconds of --calls calls (after
two warm-up calls) and the number of studies matched. The archive is
loaded with one instance per study (instances do not take part in a
study-level name search) and cached as the other benchmarks' are
(bench/archive.py, $PACS_BENCH_CACHE).
"""

from __future__ import annotations

from .worklist import run, time_calls

# What a radiologist types: a given name (the word people are called by), a
# one-letter start, family + middle, a whole name, a name with its diacritics,
# a name nobody has.
TERMS = ["AN", "T", "NGUYEN", "NGUYEN VAN", "NGUYEN VAN AN", "Hương", "ZZZ"]


if __name__ == "__main__":
    run(__doc__, "name=", lambda a: f"Study list by patient name (any word), {a.studies:,} studies",
        lambda a, url: time_calls(url, a.calls, [{"name": t} for t in TERMS], lambda f: f["name"]))
