"""The metrics every actor group exports to the Ray dashboard (ray.util.metrics), with tags role/recipe/run.

The names below are documented in cluster/README.md and plotted by cluster/grafana/rlstitch.json.
"""

from __future__ import annotations

from functools import cache

TAGS = ("role", "recipe", "run")
# name -> (kind, description); Ray exports them with the "ray_" prefix.
METRICS = {
    "rlstitch_rollouts_total": ("counter", "Rollouts (samples) produced"),
    "rlstitch_denoise_steps_total": ("counter", "Denoising steps run by rollout workers"),
    "rlstitch_denoise_steps_saved_total": ("counter", "Denoising steps saved by stopping rollouts at tau"),
    "rlstitch_value_calls_total": ("counter", "Value-model calls (batched requests)"),
    "rlstitch_value_batch_size": ("histogram", "Latents per value call"),
    "rlstitch_value_latency_s": ("histogram", "Seconds per value call"),
    "rlstitch_learner_step_s": ("histogram", "Seconds per learner optimizer step"),
    "rlstitch_weight_sync_s": ("histogram", "Seconds per weight broadcast to rollout workers"),
    "rlstitch_weight_sync_bytes_total": ("counter", "Bytes of weights sent to rollout workers"),
    "rlstitch_reward_mean": ("gauge", "Mean training reward of the last batch"),
    "rlstitch_value_mean": ("gauge", "Mean value of the last value call"),
    "rlstitch_cost_gpu_s_total": ("counter", "Projected GPU-seconds of training work (cost table)"),
    "rlstitch_stats_shards_total": ("counter", "Probe shards whose stitch statistics were collected"),
    "rlstitch_stats_tokens_total": ("counter", "Probe tokens added to stitch statistics"),
    "rlstitch_fit_residual": ("gauge", "Relative residual of the chosen stitch pair"),
    "rlstitch_finetune_loss": ("gauge", "Stitch finetune loss"),
}
# Which workload exports which metric (the end-to-end tests check each group on its own recipe).
BUILD_METRICS = ("rlstitch_stats_shards_total", "rlstitch_stats_tokens_total", "rlstitch_fit_residual",
                 "rlstitch_finetune_loss")
TRAINING_METRICS = tuple(name for name in METRICS if name not in BUILD_METRICS)
BOUNDARIES = {
    "rlstitch_value_batch_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
    "rlstitch_value_latency_s": [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
    "rlstitch_learner_step_s": [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60],
    "rlstitch_weight_sync_s": [0.001, 0.01, 0.05, 0.1, 0.5, 1, 5],
}


@cache
def metric(name: str):
    """The process's ray.util.metrics object for a documented name (created once per process)."""
    from ray.util import metrics as m

    kind, desc = METRICS[name]
    if kind == "counter":
        return m.Counter(name, description=desc, tag_keys=TAGS)
    if kind == "gauge":
        return m.Gauge(name, description=desc, tag_keys=TAGS)
    return m.Histogram(name, description=desc, boundaries=BOUNDARIES[name], tag_keys=TAGS)


def record(name: str, value: float, tags: dict[str, str]) -> None:
    """Add to a counter, set a gauge or observe a histogram value."""
    obj = metric(name)
    kind = METRICS[name][0]
    if kind == "counter":
        obj.inc(value, tags=tags)
    elif kind == "gauge":
        obj.set(value, tags=tags)
    else:
        obj.observe(value, tags=tags)


def zero_counters(names, tags: dict[str, str]) -> None:
    """Export counters at 0 before a phase increments them: rate() counts increases between scrapes, so a series
    that first appears already at its final value (a phase shorter than a scrape interval) shows nothing."""
    for name in names:
        if METRICS[name][0] != "counter":
            raise ValueError(f"{name} is a {METRICS[name][0]}, not a counter")
        metric(name)._record(0.0, tags=tags)  # Counter.inc refuses 0; this is the point inc would record, at 0


def promql(name: str) -> str:
    """The panel query of a documented metric (Ray exports it with the "ray_" prefix)."""
    kind = METRICS[name][0]
    sel = '{run=~"$run", recipe=~"$recipe"}'
    if kind == "counter":
        return f"sum by (role) (rate(ray_{name}{sel}[1m]))"
    if kind == "gauge":
        return f"avg by (role) (ray_{name}{sel})"
    return f"histogram_quantile(0.5, sum by (le, role) (rate(ray_{name}_bucket{sel}[1m])))"


def grafana_dashboard() -> dict:
    """A Grafana dashboard with one time-series panel per documented metric (cluster/grafana/rlstitch.json)."""
    panels = []
    for k, (name, (kind, desc)) in enumerate(METRICS.items()):
        unit = "s" if name.endswith("_s") else ("bytes" if "bytes" in name else "short")
        title = desc + (" (per second)" if kind == "counter" else " (median)" if kind == "histogram" else "")
        panels.append({
            "id": k + 1, "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (k % 2), "y": 8 * (k // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"expr": promql(name), "legendFormat": "{{role}}", "refId": "A"}],
        })
    variables = [{"name": "datasource", "type": "datasource", "query": "prometheus"}] + [
        {"name": v, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         # every rlstitch series, not one recipe's metric: a stitch build exports no rollouts, and its runs must show
         "query": f'label_values({{__name__=~"ray_rlstitch_.+"}}, {v})', "includeAll": True, "multi": True,
         "current": {"text": "All", "value": "$__all"}}
        for v in ("run", "recipe")
    ]
    return {"title": "rlstitch", "uid": "rlstitch", "schemaVersion": 39, "version": 1, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "templating": {"list": variables}, "panels": panels}


def scrape(text: str) -> dict[str, float]:
    """Sum of every rlstitch series in a Prometheus text export, by metric name (histograms: their _count)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ray_rlstitch_"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0].removeprefix("ray_")
        if name.endswith(("_bucket", "_sum")):
            continue
        name = name.removesuffix("_count")
        if name in METRICS:
            totals[name] = totals.get(name, 0.0) + abs(float(value))
    return totals


if __name__ == "__main__":
    import json
    import sys

    # `python -m actors.metrics > cluster/grafana/rlstitch.json` regenerates the committed dashboard.
    json.dump(grafana_dashboard(), sys.stdout, indent=1)
    sys.stdout.write("\n")
