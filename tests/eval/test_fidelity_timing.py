"""Cost timing of the fidelity benchmark: methods are timed in interleaved rounds, so a slow spell hits all alike."""

from __future__ import annotations

import time


def test_interleaved_ms_alternates_the_methods_and_keeps_their_ratio():
    from rlstitch.eval.fidelity import interleaved_ms

    calls = []

    def timed(name: str, seconds: float):
        return lambda: (calls.append(name), time.sleep(seconds))

    ms = interleaved_ms({"slow": timed("slow", 0.02), "fast": timed("fast", 0.005)}, repeats=3)
    assert calls == ["slow", "fast"] + ["slow", "fast"] * 3  # one warm-up each, then rounds in turn
    assert ms["slow"] >= 19 and ms["fast"] >= 4.5 and ms["slow"] > 2 * ms["fast"]


def test_costs_times_every_method_with_the_same_inputs():
    import torch

    from rlstitch.eval.fidelity import costs

    class Probe:
        """A stand-in estimator that records the batch it was asked about."""

        def __init__(self):
            self.seen = []

        def value(self, z, t, prompts):
            self.seen.append(("value", z.shape, float(t[0]), len(prompts)))
            return z.sum((1, 2, 3))

        def value_and_grad(self, z, t, prompts):
            self.seen.append(("grad", z.shape, float(t[0]), len(prompts)))
            z = z.detach().requires_grad_(True)
            v = z.square().sum((1, 2, 3))
            return v.detach(), torch.autograd.grad(v.sum(), z)[0]

    a, b = Probe(), Probe()
    res = costs({"a": a, "b": b}, torch.ones(4, 4, 8, 8), ["p"] * 4, repeats=2)
    assert set(res) == {"a", "b"} and all(set(r) == {"value_ms", "grad_ms", "grad_peak_mb"} for r in res.values())
    assert a.seen == b.seen and len(a.seen) == 3 + 3 + 1  # value x (1+2), grad x (1+2), one memory probe
    assert {s[1:] for s in a.seen} == {((4, 4, 8, 8), 0.5, 4)}


def test_plot_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    """A PNG write that fails midway leaves neither the target nor a temp file behind."""
    import pytest
    from matplotlib.figure import Figure

    from rlstitch.eval.fidelity import METHODS, TIMES, plot

    res = {"r1_i2t": {m: {t: 0.5 for t in TIMES} for m in METHODS}, "gallery_size": 8}
    plot(res, tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes()[:4] == b"\x89PNG"

    def broken(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot(res, tmp_path / "fid.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]
