"""The panel checks of actors/observe.py on canned Prometheus answers (the live check: tests/recipes/test_observability.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from actors.observe import judge, panel_queries, regex_escape, substitute

BOARD = json.loads((Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "rlstitch.json").read_text())
RATE = 'sum by (role) (rate(ray_rlstitch_rollouts_total{run=~"$run"}[1m]))'
GAUGE = 'avg by (role) (ray_rlstitch_reward_mean{run=~"$run"})'


def series(role: str | None, *values: str) -> dict:
    """One range-query series with a role label (or none) and the given sample values."""
    return {"metric": {"role": role} if role else {}, "values": [[1000 + 2 * k, v] for k, v in enumerate(values)]}


def test_every_panel_target_is_listed():
    queries = panel_queries(BOARD)
    assert len(queries) == len(BOARD["panels"]) and all(legend == "{{role}}" for _, _, legend in queries)


def test_variables_become_grafana_all_regexes():
    assert regex_escape("nft_flux-stitch.1") == r"nft_flux-stitch\\.1"
    sent = substitute('x{run=~"$run", recipe=~"${recipe}", r=~"$runs"}', {"run": "a|b", "recipe": "c", "runs": "d"})
    assert sent == 'x{run=~"a|b", recipe=~"c", r=~"d"}'


def test_judge_names_what_a_panel_would_show_wrong():
    assert judge(RATE, "{{role}}", [])[0] == "no series"
    raw = 'sum by (role) (ray_rlstitch_rollouts_total{run=~"$run"})'
    assert "without rate()" in judge(raw, "{{role}}", [series("rollout", "1", "2")])[0]
    assert "legend" in judge(RATE, "{{role}}", [series(None, "1")])[0]  # summed away the label the legend shows
    assert judge(RATE, "{{role}}", [series("rollout", "NaN", "NaN")])[0] == "only NaN / Inf values"
    assert "never above 0" in judge(RATE, "{{role}}", [series("rollout", "0", "0")])[0]  # counter not increasing
    assert judge(RATE, "{{role}}", [series("rollout", "0", "0.5", "NaN")]) == (None, 0.5)
    problem, top = judge(GAUGE, "{{role}}", [series("driver", "-0.25")])  # a gauge may be negative
    assert problem is None and math.isclose(top, -0.25)
