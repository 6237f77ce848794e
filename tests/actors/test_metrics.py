"""The committed Grafana board plots every documented metric."""

from __future__ import annotations

import json
from pathlib import Path

from actors.metrics import METRICS, grafana_dashboard

BOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "rlstitch.json"


def test_committed_board_is_current_and_complete():
    board = json.loads(BOARD.read_text())
    assert board == grafana_dashboard(), "regenerate with: python -m actors.metrics > cluster/grafana/rlstitch.json"
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for name in METRICS:
        assert f"ray_{name}" in exprs
