"""Every custom Ray metric mathprm exports, declared once: name, kind, meaning, tags.

The stages create their metrics from `METRICS` with `create`, the Grafana dashboard in
`cluster/grafana/mathprm.json` is generated from it (`grafana_dashboard`; a test keeps the
file in step), and docs/METRICS.md lists it. Ray exports a custom metric to Prometheus as
`ray_<name>` (counters as `ray_<name>_total`, histograms as `ray_<name>_bucket/_sum/_count`)
on each node's metrics endpoint, which the Ray dashboard's Metrics page and Grafana read.
This module imports Ray only inside `create`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class MetricSpec:
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    stage: str  # the dashboard row: mcts, prm, ppo, serve
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms: bucket upper bounds
    unit: str = ""  # Grafana unit of the panel ("", "ms", "percentunit", ...)


_LATENCY_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 40000, 80000)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)

METRICS: dict[str, MetricSpec] = {
    # Tree search (mathprm.labels.stage, on the expander actors)
    "mathprm_mcts_problems": MetricSpec("counter", "problems searched", "mcts", ("method",)),
    "mathprm_mcts_rollouts": MetricSpec("counter", "completions generated", "mcts", ("method",)),
    "mathprm_mcts_steps_labelled": MetricSpec("counter", "steps labelled", "mcts", ("method",)),
    "mathprm_mcts_tokens": MetricSpec("counter", "tokens generated in rollouts", "mcts", ("method",)),
    # PRM training (mathprm.train.prm, rank 0)
    "mathprm_prm_steps": MetricSpec("counter", "PRM optimiser steps", "prm"),
    "mathprm_prm_loss": MetricSpec("gauge", "training BCE over the last logging window", "prm"),
    "mathprm_prm_solutions_per_s": MetricSpec("gauge", "solutions trained per second (all workers)", "prm"),
    "mathprm_prm_val_bce": MetricSpec("gauge", "validation BCE at the last evaluation", "prm"),
    "mathprm_prm_val_auroc": MetricSpec("gauge", "validation step AUROC at the last evaluation", "prm"),
    # PPO (mathprm.train.ppo, rank 0)
    "mathprm_ppo_updates": MetricSpec("counter", "PPO updates done", "ppo"),
    "mathprm_ppo_tokens": MetricSpec("counter", "tokens generated in PPO rollouts (all workers)", "ppo"),
    "mathprm_ppo_reward": MetricSpec("gauge", "mean episode reward of the last update", "ppo"),
    "mathprm_ppo_kl": MetricSpec("gauge", "mean KL(policy || reference) per episode", "ppo"),
    "mathprm_ppo_kl_coef": MetricSpec("gauge", "current KL coefficient", "ppo"),
    "mathprm_ppo_clip_frac": MetricSpec("gauge", "share of action tokens whose ratio was clipped", "ppo",
                                        unit="percentunit"),
    "mathprm_ppo_entropy": MetricSpec("gauge", "mean next-token entropy on action tokens", "ppo"),
    "mathprm_ppo_value_loss": MetricSpec("gauge", "value-head loss (advantage=gae)", "ppo"),
    "mathprm_ppo_tokens_per_s": MetricSpec("gauge", "generated tokens per second of update time", "ppo"),
    "mathprm_ppo_held_out_accuracy": MetricSpec("gauge", "greedy accuracy on held-out problems, last evaluation",
                                                "ppo", unit="percentunit"),
    "mathprm_ppo_staleness": MetricSpec("gauge", "updates the last batch's weights lagged the learners' (rollout "
                                        "engines; at most rollout.max_staleness)", "ppo"),
    "mathprm_ppo_logp_gap": MetricSpec("gauge", "largest |sampler - learner| log-prob of an action token before "
                                       "the update (weights out of sync show here)", "ppo"),
    # Serving (mathprm.serve)
    "mathprm_serve_requests": MetricSpec("counter", "searches run for solve requests, by strategy and outcome (HTTP status)", "serve",
                                         ("strategy", "status")),
    "mathprm_serve_latency_ms": MetricSpec("histogram", "time a solve request's search took", "serve", ("strategy",),
                                           _LATENCY_MS, "ms"),
    "mathprm_serve_tokens": MetricSpec("counter", "tokens generated for solve requests", "serve", ("strategy",)),
    "mathprm_serve_generator_batch": MetricSpec("histogram", "calls merged into one generator batch", "serve", (),
                                                _BATCH),
    "mathprm_serve_prm_batch": MetricSpec("histogram", "solutions scored in one PRM batch", "serve", (), _BATCH),
    "mathprm_serve_prefix_cache_tokens": MetricSpec("gauge", "tokens of shared prefixes a model's prefix cache holds "
                                                    "(prm; policy with the hf backend)", "serve", ("model",)),
    "mathprm_serve_prefix_cache_bytes": MetricSpec("gauge", "bytes a model's prefix cache holds on its device",
                                                   "serve", ("model",), unit="bytes"),
    "mathprm_serve_prefix_cache_saved": MetricSpec("gauge", "share of the tokens a full pass would compute that the "
                                                   "prefix cache spared the model", "serve", ("model",),
                                                   unit="percentunit"),
}


def create(name: str) -> Any:
    """The Ray metric object for `name` (a key of METRICS); create it once per process."""
    from ray.util import metrics

    spec = METRICS[name]
    if spec.kind == "counter":
        return metrics.Counter(name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(name, spec.description, tag_keys=spec.tags)
    return metrics.Histogram(name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)


def prometheus_name(name: str) -> str:
    """The series Prometheus holds for `name` (what a dashboard queries)."""
    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}[METRICS[name].kind]
    return f"ray_{name}{suffix}"


def _query(name: str) -> tuple[str, str]:
    """(PromQL, legend) of `name`'s panel: a rate for counters, p50/p95 for histograms."""
    spec, series = METRICS[name], prometheus_name(name)
    by = f" by ({', '.join(spec.tags)})" if spec.tags else ""
    legend = " ".join(f"{{{{{t}}}}}" for t in spec.tags) or name.removeprefix("mathprm_")
    if spec.kind == "counter":
        return f"sum(rate({series}[1m])){by}", legend
    if spec.kind == "histogram":
        le = ", ".join(("le", *spec.tags))
        return f"histogram_quantile(0.95, sum(rate({series}[5m])) by ({le}))", f"p95 {legend}"
    return f"max({series}){by}", legend


def grafana_dashboard() -> dict[str, Any]:
    """A Grafana dashboard (JSON model) with one row per stage and one panel per metric, on a
    `datasource` variable pointing at the Prometheus that scrapes Ray."""
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    titles = {"mcts": "Tree search (jobs/mcts.py)", "prm": "PRM training (jobs/train_prm.py)",
              "ppo": "PPO (jobs/train_ppo.py)", "serve": "Serving (serve_configs/guided.yaml)"}
    for stage, title in titles.items():
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        names = [n for n, s in METRICS.items() if s.stage == stage]
        for i, name in enumerate(names):
            spec = METRICS[name]
            expr, legend = _query(name)
            panels.append({
                "type": "timeseries", "id": next_id, "title": name.removeprefix("mathprm_").replace("_", " "),
                "description": spec.description + (" (per second)" if spec.kind == "counter" else ""),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 7, "w": 8, "x": 8 * (i % 3), "y": y + 7 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": spec.unit or ("ops" if spec.kind == "counter" else "short")},
                                "overrides": []},
                "targets": [{"refId": "A", "expr": expr, "legendFormat": legend,
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
            })
            next_id += 1
        y += 7 * -(-len(names) // 3)
    return {
        "title": "mathprm", "uid": "mathprm", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["mathprm", "ray"], "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }
