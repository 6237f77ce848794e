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
    "rlstitch_stats_shards_total": ("counter", "Probe shards whose stitch statistics were collected"),
    "rlstitch_stats_tokens_total": ("counter", "Probe tokens added to stitch statistics"),
    "rlstitch_fit_residual": ("gauge", "Relative residual of the chosen stitch pair"),
    "rlstitch_finetune_loss": ("gauge", "Stitch finetune loss"),
}
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
