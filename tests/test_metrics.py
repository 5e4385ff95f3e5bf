"""The metric registry: well-formed, documented, and the Grafana dashboard generated from it is the one shipped."""

import json
from pathlib import Path

from mathprm.metrics import METRICS, grafana_dashboard, prometheus_name

REPO = Path(__file__).resolve().parents[1]


def test_every_metric_is_well_formed():
    for name, spec in METRICS.items():
        assert name.startswith(f"mathprm_{spec.stage}_"), name
        assert spec.kind in ("counter", "gauge", "histogram") and spec.description
        assert bool(spec.boundaries) == (spec.kind == "histogram"), name
        assert list(spec.boundaries) == sorted(spec.boundaries), name
    assert prometheus_name("mathprm_ppo_updates") == "ray_mathprm_ppo_updates_total"
    assert prometheus_name("mathprm_serve_latency_ms") == "ray_mathprm_serve_latency_ms_bucket"


def test_the_shipped_grafana_dashboard_is_the_generated_one_and_covers_every_metric():
    shipped = json.loads((REPO / "cluster" / "grafana" / "mathprm.json").read_text())
    assert shipped == grafana_dashboard(), "cluster/grafana/mathprm.json is stale: regenerate it (docs/METRICS.md)"
    exprs = " ".join(t["expr"] for p in shipped["panels"] for t in p.get("targets", []))
    for name in METRICS:
        assert prometheus_name(name) in exprs, name
    ids = [p["id"] for p in shipped["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_is_documented():
    doc = (REPO / "docs" / "METRICS.md").read_text()
    for name, spec in METRICS.items():
        assert f"| `{name}` | {spec.kind} |" in doc, name
