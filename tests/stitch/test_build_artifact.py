"""End-to-end stitch build on a random-weight world: artifact contents, load checks, resume."""

from __future__ import annotations

import json

import pytest
import torch

SMALL = ["probe_images=64", "batch=32", "j_max=2", "finetune.steps=4", "finetune.batch=8",
         "finetune.train_images=32", "finetune.val_images=8", "finetune.eval_every=2", "finetune.ckpt_every=2",
         "finetune.warmup=1"]


@pytest.fixture(scope="module")
def built(random_world, tmp_path_factory):
    """A small StitchVM build with baselines on the random world."""
    from rlstitch.stitch.build import main

    out = tmp_path_factory.mktemp("stitch")
    main([*SMALL, f"out={out}", "baselines=true"])
    return out


def test_build_writes_every_part(built):
    m = json.loads((built / "manifest.json").read_text())
    assert 1 <= m["i"] <= 8 and 0 <= m["j"] <= 2
    assert len(m["fit"]["residuals"]) == 8 * 3
    assert m["fit"]["chosen_residual"] == pytest.approx(min(m["fit"]["residuals"].values()), abs=1e-6)
    assert [h["step"] for h in m["history"]] == [2, 4]
    for part in ("closed_form", "vae_stitch", "noisy_reward"):
        assert (built / part / "manifest.json").is_file() and (built / part / "weights.safetensors").is_file()
    assert (built / "residuals.png").stat().st_size > 1000 and (built / "stats.safetensors").is_file()
    assert json.loads((built / "vae_stitch" / "manifest.json").read_text())["history"][-1]["step"] == 12  # 3x


def test_artifact_loads_and_scores(built, random_world):
    from rlstitch.models.registry import load_backbone, load_reward
    from rlstitch.stitch import artifact
    from rlstitch.stitch.noisy import NoisyReward

    vm = artifact.load(built, load_backbone("tiny-sd3"), load_reward("tiny-clip"))
    noisy = NoisyReward.load(built / "noisy_reward", load_reward("tiny-clip"))
    prompts = ["a red circle", "a blue square"]
    for model in (vm, noisy):
        v, g = model.value_and_grad(torch.randn(2, 4, 8, 8), 0.5, prompts)
        assert v.shape == (2,) and torch.isfinite(v).all() and g.shape == (2, 4, 8, 8)
        # Loaded for serving: frozen, so a backward through V (as DRaFT does) leaves no weight gradients behind.
        z = torch.randn(2, 4, 8, 8, requires_grad=True)
        model.value(z, 0.5, prompts).sum().backward()
        assert z.grad is not None and all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_artifact_rejects_other_backbone_or_reward(built, random_world):
    from rlstitch.models.registry import load_backbone, load_reward
    from rlstitch.stitch import artifact

    with pytest.raises(artifact.ArtifactError, match="built for backbone 'tiny-sd3', got 'tiny-flux'"):
        artifact.load(built, load_backbone("tiny-flux"), load_reward("tiny-clip"))
    bb = load_backbone("tiny-sd3")
    with torch.no_grad():
        next(bb.parameters()).add_(1.0)  # same name, other weights
    with pytest.raises(artifact.ArtifactError, match="weights fingerprint"):
        artifact.load(built, bb, load_reward("tiny-clip"))
    with pytest.raises(artifact.ArtifactError, match="built for reward 'tiny-clip', got 'tiny-aesthetic'"):
        artifact.load(built, load_backbone("tiny-sd3"), load_reward("tiny-aesthetic"))


def test_altered_or_truncated_weights_fail_checksum(built, random_world, tmp_path):
    import shutil

    from rlstitch.models.registry import load_backbone, load_reward
    from rlstitch.stitch import artifact

    copy = tmp_path / "a"
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("ckpt*", "vae_stitch", "noisy_reward"))
    w = copy / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(artifact.ArtifactError, match="truncated or altered"):
        artifact.load(copy, load_backbone("tiny-sd3"), load_reward("tiny-clip"))
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(artifact.ArtifactError, match="not a StitchVM artifact manifest"):
        artifact.load(copy, load_backbone("tiny-sd3"), load_reward("tiny-clip"))


def test_bad_config_key_is_a_clear_error():
    from rlstitch.config import ConfigError
    from rlstitch.stitch.build import main

    with pytest.raises(ConfigError, match="finetune.stepz"):
        main(["finetune.stepz=3"])
    with pytest.raises(ValueError, match="backbone='sd9' is not one of"):
        main(["backbone=sd9"])


def test_resumed_finetune_equals_uninterrupted(random_world, tmp_path):
    from dataclasses import replace

    from rlstitch.data.probe import load_images
    from rlstitch.models.registry import load_backbone, load_codec, load_reward
    from rlstitch.stitch.finetune import FinetuneConfig, finetune, teacher_targets
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import StitchVM

    bb, rw, codec = load_backbone("tiny-sd3"), load_reward("tiny-clip"), load_codec("tiny-vae")
    train = teacher_targets(rw, codec, load_images("tinyworld", 16)[0])
    val = teacher_targets(rw, codec, load_images("tinyworld", 4, "val")[0])
    cfg = FinetuneConfig(steps=6, batch=4, train_images=16, val_images=4, eval_every=3, ckpt_every=3, warmup=2)

    def fresh():
        torch.manual_seed(0)
        return StitchVM(bb, rw, StitchLayer(bb.hidden_dim, rw.width, (8, 8), rw.grid), i=2, j=1)

    straight = fresh()
    finetune(straight, rw, train, val, cfg)
    resumed = fresh()
    finetune(resumed, rw, train, val, replace(cfg, steps=3), tmp_path)  # stops after 3 steps (checkpoint)
    hist = finetune(resumed, rw, train, val, cfg, tmp_path)  # a new process would do the same
    assert [h["step"] for h in hist] == [3, 6]
    for a, b in zip(straight.layer.state_dict().values(), resumed.layer.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(straight.tail.state_dict().values(), resumed.tail.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fidelity_benchmark_reports_every_method(built, random_world, tmp_path):
    from rlstitch.eval.fidelity import METHODS, TIMES, main

    out = tmp_path / "fid.json"
    main(["--stitch", str(built), "--json", str(out), "--gallery", "40"])
    res = json.loads(out.read_text())
    for key in ("r1_i2t", "r1_t2i"):
        assert set(res[key]) == set(METHODS)
        for m in METHODS:
            assert set(res[key][m]) == set(TIMES) and all(0 <= v <= 1 for v in res[key][m].values())
    assert len(set(res["r1_i2t"]["clean"].values())) == 1  # clean: one figure under every t
    assert set(res["cos_to_clean"]) == set(METHODS) - {"clean"}
    assert all(-1 <= v <= 1 for row in res["cos_to_clean"].values() for v in row.values())
    for m in ("stitchvm", "tweedie"):
        assert res["cost"][m]["value_ms"] > 0 and res["cost"][m]["grad_peak_mb"] > 0
    assert res["gallery_size"] == 40 and (tmp_path / "fid.png").stat().st_size > 1000


@pytest.mark.parametrize("student", ["stitchvm", "noisy_reward"])
def test_finetune_trains_the_reward_tower_and_leaves_the_teachers_alone(random_world, student):
    """The tail is copied from a frozen reward: the finetune must still train it (a frozen copy once trained only
    the stitch), never the backbone or the reward, and hand the student back frozen for serving."""
    from rlstitch.data.probe import load_images
    from rlstitch.models.registry import load_backbone, load_codec, load_reward
    from rlstitch.stitch.finetune import FinetuneConfig, finetune, teacher_targets
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.noisy import NoisyReward
    from rlstitch.stitch.vm import StitchVM

    bb, rw, codec = load_backbone("tiny-sd3"), load_reward("tiny-clip"), load_codec("tiny-vae")
    train = teacher_targets(rw, codec, load_images("tinyworld", 16)[0])
    val = teacher_targets(rw, codec, load_images("tinyworld", 4, "val")[0])
    torch.manual_seed(0)
    if student == "stitchvm":
        model = StitchVM(bb, rw, StitchLayer(bb.hidden_dim, rw.width, (8, 8), rw.grid), i=2, j=0)
        tower = model.tail
    else:
        model = NoisyReward(rw, bb.latent_channels, (8, 8))
        tower = model.tower
    tower0, bb0, rw0 = ({k: v.detach().clone() for k, v in m.state_dict().items()} for m in (tower, bb, rw))
    finetune(model, rw, train, val, FinetuneConfig(steps=2, batch=4, train_images=16, val_images=4, eval_every=2,
                                                   warmup=1))
    after = tower.state_dict()
    for k in range(len(tower.blocks)):  # every block of the reward tower learnt
        for name in ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            key = f"blocks.{k}.{name}"
            assert not torch.equal(tower0[key], after[key]), f"{key} did not train"
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in bb0.items())
    assert all(torch.equal(v, rw.state_dict()[k]) for k, v in rw0.items())
    assert not any(p.requires_grad for m in model.trainable_modules().values() for p in m.parameters())


def test_bf16_finetune_runs_the_forward_in_bf16_and_keeps_fp32_weights(random_world):
    """precision=bf16 autocasts the student's forward (auto stays fp32 on the CPU); weights and losses stay fp32."""
    from rlstitch.data.probe import load_images
    from rlstitch.models.registry import load_backbone, load_codec, load_reward
    from rlstitch.stitch.finetune import FinetuneConfig, finetune, teacher_targets
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import StitchVM

    bb, rw, codec = load_backbone("tiny-sd3"), load_reward("tiny-clip"), load_codec("tiny-vae")
    train = teacher_targets(rw, codec, load_images("tinyworld", 16)[0])
    val = teacher_targets(rw, codec, load_images("tinyworld", 4, "val")[0])

    def run(precision: str):
        torch.manual_seed(0)
        model = StitchVM(bb, rw, StitchLayer(bb.hidden_dim, rw.width, (8, 8), rw.grid), i=2, j=0)
        seen = set()
        hook = model.tail.blocks[0].mlp.c_fc.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
        cfg = FinetuneConfig(steps=2, batch=4, train_images=16, val_images=4, eval_every=2, warmup=1,
                             precision=precision)
        hist = finetune(model, rw, train, val, cfg)
        hook.remove()
        assert all(p.dtype == torch.float32 for m in model.trainable_modules().values() for p in m.parameters())
        return seen, hist[-1]["val_loss"]

    (seen32, loss32), (seen_auto, loss_auto), (seen16, loss16) = run("fp32"), run("auto"), run("bf16")
    assert seen32 == seen_auto == {torch.float32} and loss_auto == loss32
    assert seen16 == {torch.bfloat16}
    assert loss16 == pytest.approx(loss32, rel=0.05) and loss16 != loss32
    with pytest.raises(ValueError, match="finetune.precision must be auto, fp32 or bf16"):
        FinetuneConfig(precision="fp16").validate()


def test_manifest_missing_a_field_is_an_artifact_error(tiny_clip_reward, tmp_path):
    """A manifest without a field load needs (hand-edited, older tool) names the field, not a bare KeyError."""
    from rlstitch.stitch import artifact
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import LatentTokens, StitchVM

    torch.manual_seed(0)
    vm = StitchVM(LatentTokens(4), tiny_clip_reward, StitchLayer(4, tiny_clip_reward.width, (8, 8),
                                                                 tiny_clip_reward.grid), i=1, j=1)
    artifact.save(vm, tmp_path)
    assert artifact.load(tmp_path, LatentTokens(4), tiny_clip_reward).j == 1
    full = json.loads((tmp_path / "manifest.json").read_text())
    for field in ("weights_sha256", "backbone", "grid_r"):
        (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in full.items() if k != field}))
        with pytest.raises(artifact.ArtifactError, match=f"manifest.json: missing field '{field}'"):
            artifact.load(tmp_path, LatentTokens(4), tiny_clip_reward)


def test_resume_refuses_a_checkpoint_of_another_run(tiny_clip_reward, tmp_path):
    """A checkpoint folder left by another student (other j) or other batch knobs is not continued silently."""
    from dataclasses import replace

    from rlstitch.stitch.finetune import FinetuneConfig, Targets, finetune
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import LatentTokens, StitchVM

    rw = tiny_clip_reward

    def student(j: int):
        torch.manual_seed(0)
        return StitchVM(LatentTokens(4), rw, StitchLayer(4, rw.width, (8, 8), rw.grid), i=1, j=j)

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(8, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb, tok = student(1).embed(z0, torch.zeros(8), return_tokens=True)
    data = Targets(z0, torch.randn(emb.shape, generator=g), torch.randn(tok.shape, generator=g))
    cfg = FinetuneConfig(steps=2, batch=4, train_images=8, val_images=8, eval_every=2, ckpt_every=2, warmup=1)
    finetune(student(1), rw, data, data, cfg, tmp_path)
    assert [h["step"] for h in finetune(student(1), rw, data, data, replace(cfg, steps=3), tmp_path)] == [2, 3]
    with pytest.raises(ValueError, match=r"step-3 belongs to another run \(j: 1 there, 0 here\)"):
        finetune(student(0), rw, data, data, replace(cfg, steps=4), tmp_path)
    with pytest.raises(ValueError, match=r"belongs to another run \(batch: 4 there, 2 here\)"):
        finetune(student(1), rw, data, data, replace(cfg, steps=4, batch=2), tmp_path)
