"""Every recipe YAML loads into the typed config and passes start-up validation; bad knobs are named."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("nft_flux", "nft_sd35", "draft_sd35", "grpo_sd35")  # the training recipes (other recipes have other schemas)
CONFIGS = sorted(p for r in RECIPES for p in (ROOT / "recipes" / "configs" / r).glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_recipe_config_validates(path):
    from actors.trainer.world import parse

    cfg = parse(path.parent.name, [f"config={path.stem}"])
    assert cfg.recipe == path.parent.name
    assert {"rollout", "value", "learner"} == {
        next(iter(getattr(cfg.placement, r).custom_resources)) for r in ("rollout", "value", "learner")}
    for mode in ("baseline", "stitch"):
        parse(path.parent.name, [f"config={path.stem}", f"mode={mode}"])


def test_every_recipe_has_a_tiny_default_and_a_launch_docstring():
    for recipe in RECIPES:
        assert (ROOT / "recipes" / "configs" / recipe / "tiny.yaml").is_file()
        text = (ROOT / "recipes" / f"{recipe}.py").read_text()
        assert text.startswith(f'"""python recipes/{recipe}.py')


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "bootstrap"))
def test_every_recipe_docstring_starts_with_its_launch_command(recipe):
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "recipes" / f"{recipe}.py").read_text()), clean=False)
    first = doc.splitlines()[0]
    assert first.startswith(("python recipes/", "ray job submit")) and f"python recipes/{recipe}.py" in first, first


@pytest.mark.parametrize(("override", "knob"), [
    (["rollout.prompts_per_iteration=3", "placement.rollout.num_workers=2"], "placement.rollout.num_workers"),
    (["placement.learner.num_workers=3"], "placement.learner.num_workers"),
    (["rollout.stop_window=[5,11]"], "rollout.stop_window"),
    (["train.steps=7", "train.updates_per_iteration=2"], "train.updates_per_iteration"),
    (["sampler.cfg_scale=4.0"], "sampler.cfg_scale"),
    (["reward.weights=[1.0,2.0]"], "reward.weights"),
    (["mode=other"], "mode"),
    (["train.async_staleness=3"], "train.async_staleness"),
    (["rollout.stream_chunks=0"], "rollout.stream_chunks"),
])
def test_bad_knobs_are_named(override, knob, recipe="nft_flux"):
    from actors.trainer.world import parse
    from rlstitch.config import ConfigError

    with pytest.raises(ConfigError, match=knob.replace(".", r"\.")):
        parse(recipe, override)


def test_draft_cannot_train_on_stale_rollouts():
    test_bad_knobs_are_named(["train.async_staleness=1"], "train.async_staleness", recipe="draft_sd35")
