"""benchmarks/training_alignment.py's report: ratios, standard errors and merging with a previous report."""

from __future__ import annotations

from training_alignment import summarise


def run(points: list[tuple[float, float, float]], train_s: float) -> dict:
    """A recipe summary whose history is (wall_s, clean_reward, clean_reward_se) points."""
    return {"train_s": train_s, "history": [{"wall_s": w, "step": k, "clean_reward": r, "clean_reward_se": se}
                                            for k, (w, r, se) in enumerate(points)]}


def test_grpo_ratio_standard_errors_and_merge():
    previous = {"curves": {"nft": [{"wall_s": 0.0, "step": 0, "clean_reward": 0.45}], "grpo": [{"wall_s": 0.0}]},
                "train_s": {"nft": 9.0, "grpo": 1.0}}
    report = summarise({"grpo": run([(0, 0.45, 0.01), (50, 0.47, 0.01), (100, 0.50, 0.02)], 100),
                        "grpo_stitch": run([(0, 0.45, 0.01), (30, 0.49, 0.01), (60, 0.51, 0.02)], 60)}, previous)
    assert report["time_to_baseline_ratio"]["grpo"] == 0.6  # 0.51 >= 0.50 first at 60 s of the baseline's 100 s
    assert report["untrained_reward"] == 0.45 and report["untrained_se"] == 0.01
    assert report["final_se"]["grpo"] == 0.02 and report["above_untrained_se"]["grpo"] == round(0.05 / (0.02**2 + 0.01**2) ** 0.5, 2)
    assert set(report["curves"]) == {"nft", "grpo", "grpo_stitch"} and report["train_s"]["grpo"] == 100
    assert report["above_untrained_se"]["nft"] is None  # an old report without SEs


def test_gain_is_paired_over_prompts_when_scores_are_kept():
    from training_alignment import gain_in_se

    before = {"clean_reward": 0.5, "clean_reward_se": 0.1, "clean_per_prompt": [0.2, 0.5, 0.8]}
    after = {"clean_reward": 0.52, "clean_reward_se": 0.1, "clean_per_prompt": [0.21, 0.52, 0.83]}
    # differences 0.01, 0.02, 0.03: mean 0.02, sample std 0.01, SE 0.01 / sqrt(3)
    assert gain_in_se(before, after) == round(0.02 / (0.01 / 3**0.5), 2)
    assert gain_in_se({"clean_reward": 0.5}, after) is None
