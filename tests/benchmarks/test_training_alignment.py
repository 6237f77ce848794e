"""benchmarks/training_alignment.py's statistic: interpolated crossings, compute ratios, bootstrap SEs, merging."""

from __future__ import annotations

import pytest
from training_alignment import bootstrap_se, crossing, equal_compute, ratios, summarise, table


def curve(points: list[tuple[float, float]], wall_per_gpu: float = 1.0) -> list[dict]:
    """Evaluations every 5 steps at (gpu_s, clean_reward) points."""
    return [{"step": 5 * k, "gpu_s": g, "cpu_s": g / 10, "wall_s": g * wall_per_gpu, "clean_reward": r,
             "clean_reward_se": 0.01} for k, (g, r) in enumerate(points)]


BASE = [curve([(0, 0.40), (50, 0.45), (100, 0.50)]), curve([(0, 0.40), (50, 0.47), (100, 0.50)])]
FAST = [curve([(0, 0.40), (25, 0.46), (50, 0.50)]), curve([(0, 0.40), (25, 0.46), (50, 0.52)])]


def test_crossing_interpolates_between_evaluations():
    c = curve([(0, 0.40), (10, 0.50), (20, 0.60)])
    assert crossing(c, 0.45, "gpu_s") == pytest.approx(5.0)
    assert crossing(c, 0.60, "gpu_s") == pytest.approx(20.0)
    assert crossing(c, 0.61, "gpu_s") is None


def test_ratios_read_the_seed_averaged_curves():
    # baseline mean curve: 0.40, 0.46, 0.50 (gain 0.10); 90% target 0.49 at 50 + 50 * 0.03/0.04 = 87.5
    # method mean curve: 0.40, 0.46, 0.51; 0.49 at 25 + 25 * 0.03/0.05 = 40
    r = ratios(FAST, BASE, "gpu_s")
    assert r["90"] == pytest.approx(40 / 87.5)
    # 75% target 0.475: baseline 50 + 50 * 0.015/0.04 = 68.75, method 25 + 25 * 0.015/0.05 = 32.5
    assert r["75"] == pytest.approx(32.5 / 68.75)
    assert ratios(BASE, BASE, "gpu_s") == {"75": pytest.approx(1.0), "90": pytest.approx(1.0)}
    never = [curve([(0, 0.40), (25, 0.41), (50, 0.42)])] * 2
    assert ratios(never, BASE, "gpu_s")["90"] is None


def test_bootstrap_se_is_zero_for_identical_seeds_and_positive_otherwise():
    same = [BASE[0], BASE[0], BASE[0]]
    se, reached = bootstrap_se(lambda a, b: ratios(a, b, "gpu_s"), same, same, n=200)
    assert se["90"] == pytest.approx(0.0) and reached["90"] == 1.0
    se, _ = bootstrap_se(lambda a, b: ratios(a, b, "gpu_s"), FAST, BASE, n=200)
    assert se["90"] > 0


def test_equal_compute_reads_the_baseline_at_the_methods_final_compute():
    # method final 0.51 at 50; baseline mean curve at 50 is 0.46
    assert equal_compute(FAST, BASE) == pytest.approx(0.05)


def test_summarise_writes_the_issue_keys():
    report = summarise({"nft": {"0": BASE[0], "1": BASE[1]}, "nft_stitch": {"0": FAST[0], "1": FAST[1]}},
                       {"nft_stitch": 0.4})
    for key in ("compute_ratio", "compute_ratio_se", "wall_ratio", "final_mean", "final_se"):
        assert "nft_stitch" in report[key]
    assert report["compute_ratio"]["nft_stitch"]["90"] == pytest.approx(40 / 87.5, abs=1e-4)
    assert report["final_mean"]["nft_stitch"] == pytest.approx(0.51)
    assert report["final_se"]["nft_stitch"] == pytest.approx(0.01)  # seeds 0.50 / 0.52: std 0.0141 / sqrt 2
    assert report["untrained_reward"] == 0.40 and report["rank_spearman"] == {"nft_stitch": 0.4}
    assert report["gpu_s_per_step"]["nft"] == pytest.approx(10.0)
    assert report["final_diff"]["nft_stitch"] == pytest.approx(0.01)  # 0.51 - 0.50
    assert report["final_diff_se"]["nft_stitch"] == pytest.approx(0.01)  # sqrt(0.01^2 + 0)
    assert "nft_stitch" in table(report)
