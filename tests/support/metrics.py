"""A parsed Prometheus exposition (the proxy's /metrics), read with prometheus_client's own
parser so a test asserts on samples, not on text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Metrics:
    """A parsed Prometheus exposition: ``value(name, **labels)`` with the exact label set."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, default: float | None = 0.0, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())), default)

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def by(self, name: str, label: str) -> dict[str, float]:
        """{value of ``label``: sample} for a family with that one label."""
        return {dict(labels)[label]: v for labels, v in self.series(name).items()}

    def total(self, name: str, **labels: str) -> float:
        """Sum over the series of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for ls, v in self.series(name).items() if want <= set(ls))
