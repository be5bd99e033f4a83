"""The monitoring dashboard reads what the server exports: a renamed metric or label would
otherwise leave a Grafana panel silently empty."""

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from safeserve.server import metrics

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "dashboards" / "safeserve.json"


def _exported() -> dict[str, set[str]]:
    """Every series name the server's metrics expose, with the labels it may be grouped by."""
    series = {}
    for m in vars(metrics).values():
        if not isinstance(m, MetricWrapperBase):
            continue
        labels = set(m._labelnames)
        if m._type == "counter":
            series[m._name + "_total"] = labels
        elif m._type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[m._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            series[m._name] = labels
    return series


def test_every_dashboard_query_names_an_exported_metric_and_its_labels():
    exported = _exported()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= len(panels) > 10
    for expr in exprs:
        names = re.findall(r"\bsafeserve_\w+", expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",")}
            assert all(labels <= exported[n] for n in names), (expr, labels)


def test_the_dashboard_shows_every_safety_metric():
    """The safety signal's own metrics each have a panel (the point of the dashboard)."""
    shown = set(re.findall(r"\bsafeserve_\w+", DASHBOARD.read_text()))
    safety = {n for n in _exported() if n.startswith("safeserve_safety_")
              and not n.endswith(("_sum", "_count"))}
    assert safety - shown == set()
