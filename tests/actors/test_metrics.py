"""The committed Grafana board plots every documented metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.metrics import METRICS, grafana_dashboard

BOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "rlstitch.json"


def test_committed_board_is_current_and_complete():
    board = json.loads(BOARD.read_text())
    assert board == grafana_dashboard(), "regenerate with: python -m actors.metrics > cluster/grafana/rlstitch.json"
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for name in METRICS:
        assert f"ray_{name}" in exprs


def test_scrape_sums_series_and_reads_histograms_by_count():
    from actors.metrics import scrape

    text = "\n".join([
        "# HELP ray_rlstitch_rollouts_total Rollouts",
        'ray_rlstitch_rollouts_total{role="rollout",run="a"} 8.0',
        'ray_rlstitch_rollouts_total{role="rollout",run="b"} 4.0',
        'ray_rlstitch_value_latency_s_bucket{le="0.1"} 3.0',
        'ray_rlstitch_value_latency_s_sum{role="value"} 0.25',
        'ray_rlstitch_value_latency_s_count{role="value"} 3.0',
        'ray_rlstitch_reward_mean{role="driver"} -0.5',
        'ray_node_cpu_utilization{ip="127.0.0.1"} 12.0',
        'ray_rlstitch_not_documented{role="x"} 1.0',
    ])
    assert scrape(text) == {"rlstitch_rollouts_total": 12.0, "rlstitch_value_latency_s": 3.0,
                            "rlstitch_reward_mean": 0.5}


def test_every_metric_is_documented_in_the_cluster_readme():
    text = (BOARD.parents[1] / "README.md").read_text()
    assert [n for n in METRICS if f"`ray_{n}`" not in text] == []


def test_only_counters_are_zeroed():
    from actors.metrics import zero_counters

    with pytest.raises(ValueError, match="rlstitch_reward_mean is a gauge, not a counter"):
        zero_counters(["rlstitch_reward_mean"], {"role": "driver", "recipe": "nft_flux", "run": "r"})
