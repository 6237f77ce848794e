"""Check the Grafana boards against a live Prometheus: every panel's PromQL returns series with plausible values.

    python -m actors.doctor --observe http://127.0.0.1:9090 [--since 3600]

Each panel is queried through Prometheus' HTTP API over a time range, the way Grafana draws it: the board's
query variables ($run, $recipe) are resolved from Prometheus first, as Grafana's "All" does. A panel passes when
it returns at least one series, every series carries the label its legend shows, and some value is plausible:
rates and latencies above 0 (a counter that increased, a histogram that observed), gauges finite.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BOARDS = Path(__file__).resolve().parents[1] / "cluster" / "grafana"


def panel_queries(board: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every target of every panel."""
    return [(p.get("title", f"panel {p.get('id')}"), t["expr"], t.get("legendFormat", ""))
            for p in board.get("panels", []) for t in p.get("targets", []) if t.get("expr")]


def api(prom: str, path: str, **params) -> object:
    """One Prometheus HTTP API call; its `data`, or a RuntimeError with Prometheus' own error text."""
    url = f"{prom.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON body naming the PromQL error
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def variable_values(prom: str, board: dict, start: float, end: float) -> dict[str, str]:
    """Each `label_values(selector, label)` variable as the regex Grafana's "All" sends: an alternation of its values."""
    values = {}
    for var in board.get("templating", {}).get("list", []):
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", str(var.get("query", "")).strip())
        if var.get("type") != "query" or not m:
            continue
        found = api(prom, f"label/{m[2]}/values", **{"match[]": m[1], "start": start, "end": end})
        if not found:
            raise RuntimeError(f"variable ${var['name']} ({var['query']}) has no values in Prometheus: is the job's "
                               f"{m[1]} scraped?")
        values[var["name"]] = "|".join(regex_escape(v) for v in found)
    return values


def regex_escape(value: str) -> str:
    """A label value as a literal inside a PromQL regex string, escaped as Grafana does (Go string: doubled \\)."""
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    """expr with $name / ${name} replaced (longest names first, so $run does not eat $runs)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def judge(expr: str, legend: str, series: list[dict]) -> tuple[str | None, float]:
    """(problem or None, largest finite value) of one panel's range-query result."""
    if re.search(r"_total\b", expr) and not re.search(r"\b(rate|irate|increase)\(", expr):
        return "a counter without rate() / increase(): a line that only climbs", math.nan
    if not series:
        return "no series", math.nan
    labels = re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)
    unlabeled = [s["metric"] for s in series if any(not s["metric"].get(k) for k in labels)]
    if unlabeled:
        return f"series without the legend's label(s) {labels}: {unlabeled[:3]}", math.nan
    finite = [float(v) for s in series for _, v in s["values"] if math.isfinite(float(v))]
    if not finite:
        return "only NaN / Inf values", math.nan
    top = max(finite)
    # rate() of a counter and histogram quantiles must rise above 0 while the job runs; a gauge may be any value.
    if ("rate(" in expr or "histogram_quantile" in expr) and top <= 0:
        return "never above 0 (counter not increasing / histogram never observed)", top
    return None, top


def observe(prom: str, start: float, end: float, step: float = 5.0, boards: Path = BOARDS) -> list[dict]:
    """One row per panel target of every board under `boards`: title, the expr as sent, series, max, problem."""
    rows = []
    for path in sorted(boards.glob("*.json")):
        board = json.loads(path.read_text())
        values = variable_values(prom, board, start, end)
        for title, expr, legend in panel_queries(board):
            sent = substitute(expr, values)
            series = api(prom, "query_range", query=sent, start=start, end=end, step=step)["result"]
            problem, top = judge(expr, legend, series)
            rows.append({"board": path.name, "title": title, "expr": expr, "sent": sent, "series": len(series),
                         "labels": sorted({s["metric"].get("role", "") for s in series}), "max": top,
                         "problem": problem})
    return rows


def report(rows: list[dict]) -> str:
    """A plain-text table of observe()'s rows."""
    lines = [f"{'OK ' if r['problem'] is None else 'BAD'} {r['board']}: {r['title']}: {r['series']} series "
             f"{r['labels']}, max {r['max']:.4g}" + (f" -- {r['problem']}" if r["problem"] else "") for r in rows]
    return "\n".join(lines)
