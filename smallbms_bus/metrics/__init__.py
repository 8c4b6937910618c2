"""Prometheus metrics, split by concern as prometheus_client is:

- `catalog`: every family's name, type, labels and help, declared once (the contract docs/metrics.md, the
  Prometheus rules and the dashboard rely on);
- `collection`: one consistent `Snapshot` of the service per scrape, turned into families (`BmsCollector`);
- `exposition`: the text format 0.0.4 (`TextEncoder`, byte-for-byte prometheus-client's, faster);
- `http`: `MetricsServer`, `GET /metrics` on the event loop with the encoding on a paced thread;
- `docs`: docs/metrics.md generated from the catalog (`python -m smallbms_bus.metrics --markdown`).

The names below are what the rest of the service, the tests and the benchmarks import.
"""

from smallbms_bus.metrics.catalog import *  # noqa: F403  (every family constant and vocabulary)
from smallbms_bus.metrics.catalog import (
    BATTERY_FLAGS,
    BATTERY_LABELS,
    CLOSE_REASONS,
    METRICS,
    OUTPUT_NAMES,
    PHASES,
    PREFIX,
    STALE_REASONS,
    Spec,
)
from smallbms_bus.metrics.collection import BmsCollector, Snapshot, process_metrics, registry_for
from smallbms_bus.metrics.docs import GROUP_TITLES, main, markdown
from smallbms_bus.metrics.exposition import CONTENT_TYPE, TextEncoder
from smallbms_bus.metrics.http import MetricsServer, limits_of

__all__ = [
    "BATTERY_FLAGS",
    "BATTERY_LABELS",
    "CLOSE_REASONS",
    "CONTENT_TYPE",
    "GROUP_TITLES",
    "METRICS",
    "OUTPUT_NAMES",
    "PHASES",
    "PREFIX",
    "STALE_REASONS",
    "BmsCollector",
    "MetricsServer",
    "Snapshot",
    "Spec",
    "TextEncoder",
    "limits_of",
    "main",
    "markdown",
    "process_metrics",
    "registry_for",
]
