"""The Prometheus text exposition format, version 0.0.4 (what Prometheus,
Grafana Agent, VictoriaMetrics and Zabbix's Prometheus items read).

Written by hand rather than with prometheus_client: the figures are read
from the index on demand, not kept in a registry, and a few lines here save
a runtime dependency. The tests parse the output with prometheus_client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = Mapping[str, str]


@dataclass
class Family:
    """One metric: its name, type (gauge, counter, summary, untyped), help
    text and samples (labels, value). A summary's samples carry their own
    suffix (``_sum``, ``_count``) in *suffix*."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | int | None, labels: Labels | None = None, suffix: str = "") -> Family:
        """One sample; a value of None (not known here) is left out."""
        if value is not None:
            self.samples.append((suffix, dict(labels or {}), float(value)))
        return self


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # Counts and bytes as integers (no "1.234e+12" a person has to decode).
    if value.is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family]) -> str:
    """The exposition text of *families*: each name once, with its HELP and
    TYPE lines, then its samples; a family without samples is left out."""
    lines: list[str] = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            text = ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in labels.items())
            lines.append(f"{family.name}{suffix}{{{text}}} {_number(value)}" if text
                         else f"{family.name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"
