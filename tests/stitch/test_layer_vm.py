"""Stitching layer and StitchVM: exact linear fit at step 0, shapes, value/grad interface."""

from __future__ import annotations

import pytest
import torch

from rlstitch.stitch.layer import StitchLayer, resample_tokens


def test_layer_starts_as_the_linear_fit():
    torch.manual_seed(0)
    layer = StitchLayer(16, 8, (4, 4), (4, 4))
    W, b, cls = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8), torch.randn(8)
    layer.init_from_fit(W, b, cls)
    h = torch.randn(3, 16, 16)
    out = layer(h)
    assert out.shape == (3, 17, 8)
    torch.testing.assert_close(out[:, 1:], h @ W.float() + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], cls.expand(3, -1))
    assert layer.residual[-1].weight.abs().sum() == 0  # G's last layer starts at zero


def test_layer_rejects_a_fit_of_other_shape():
    layer = StitchLayer(16, 8, (4, 4), (4, 4))
    with pytest.raises(ValueError, match="do not match the layer"):
        layer.init_from_fit(torch.zeros(8, 16), torch.zeros(16, 8), torch.zeros(8))


def test_resample_commutes_with_a_linear_map():
    x, W = torch.randn(2, 64, 5), torch.randn(5, 3)
    a = resample_tokens(x @ W, (8, 8), (4, 4))
    torch.testing.assert_close(a, resample_tokens(x, (8, 8), (4, 4)) @ W, atol=1e-5, rtol=1e-5)
    assert resample_tokens(x, (8, 8), (8, 8)) is x


def test_stitchvm_value_and_grad(random_backbone, tiny_clip_reward):
    from rlstitch.stitch.vm import StitchVM

    layer = StitchLayer(random_backbone.hidden_dim, tiny_clip_reward.width, (8, 8), tiny_clip_reward.grid)
    vm = StitchVM(random_backbone, tiny_clip_reward, layer, i=3, j=1).eval()
    z = torch.randn(2, 4, 8, 8)
    prompts = ["a red circle", "a blue square"]
    v, g = vm.value_and_grad(z, torch.tensor([0.2, 0.7]), prompts)
    assert v.shape == (2,) and g.shape == z.shape and g.abs().sum() > 0
    # finite-difference check of the gradient along a random direction
    d = torch.randn_like(z)
    eps = 1e-3
    with torch.no_grad():
        fd = (vm.value(z + eps * d, torch.tensor([0.2, 0.7]), prompts)
              - vm.value(z - eps * d, torch.tensor([0.2, 0.7]), prompts)) / (2 * eps)
    torch.testing.assert_close(fd, (g * d).flatten(1).sum(1), atol=2e-3, rtol=5e-2)
    assert not any(p.requires_grad for p in random_backbone.parameters())
    with pytest.raises(ValueError, match="NaN"):
        vm.value(torch.full((1, 4, 8, 8), float("nan")), 0.5, ["a red circle"])
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        vm.value(torch.randn(1, 4, 8, 8), 0.5, prompts)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        vm.value(torch.randn(1, 4, 8, 8), -0.1, ["a red circle"])


def test_stitchvm_rejects_a_layer_of_other_width(random_backbone, tiny_clip_reward):
    from rlstitch.stitch.vm import StitchVM

    with pytest.raises(ValueError, match="does not match backbone width"):
        StitchVM(random_backbone, tiny_clip_reward, StitchLayer(32, 64, (8, 8), (8, 8)), i=1, j=0)


def test_stitch_and_noisy_reward_follow_the_reward_device(random_backbone, tiny_clip_reward):
    """A stitch built on the CPU joins the reward's device (a GPU in use; 'meta' here), as does NoisyReward."""
    import copy

    from rlstitch.stitch.noisy import NoisyReward
    from rlstitch.stitch.vm import StitchVM

    reward = copy.deepcopy(tiny_clip_reward).to("meta")
    layer = StitchLayer(random_backbone.hidden_dim, reward.width, (8, 8), reward.grid)
    vm = StitchVM(random_backbone, reward, layer, i=2, j=0)
    assert {p.device.type for p in vm.layer.parameters()} == {"meta"}
    assert {p.device.type for p in vm.tail.parameters()} == {"meta"}
    noisy = NoisyReward(reward, latent_channels=4, latent_hw=(8, 8))
    assert {p.device.type for p in noisy.trainable_modules()["net"].parameters()} == {"meta"}
    assert noisy.cls.device.type == noisy.pos.device.type == "meta"


@pytest.mark.parametrize("hw", [(16, 16), (4, 4)])
def test_latent_of_another_resolution_is_a_clear_error(tiny_clip_reward, hw):
    """A latent whose token grid differs from the one the stitch / NoisyReward was built for names both grids."""
    from rlstitch.stitch.noisy import NoisyReward
    from rlstitch.stitch.vm import LatentTokens, StitchVM

    torch.manual_seed(0)
    layer = StitchLayer(4, tiny_clip_reward.width, (8, 8), tiny_clip_reward.grid)
    vae_stitch = StitchVM(LatentTokens(4), tiny_clip_reward, layer, i=1, j=1).eval()
    noisy = NoisyReward(tiny_clip_reward, 4, (8, 8)).eval()
    z = torch.randn(1, 4, *hw)
    with pytest.raises(ValueError, match=r"stitch expects DiT tokens \[B, 64, 4\] \(grid \(8, 8\)\)"):
        vae_stitch.value(z, 0.5, ["a red circle"])
    with pytest.raises(ValueError, match=rf"noisy_reward: latent must be \[B, 4, 8, 8\], got \(1, 4, {hw[0]}, {hw[1]}\)"):
        noisy.value(z, 0.5, ["a red circle"])


def test_noisy_reward_load_checks_weights_and_manifest(tiny_clip_reward, tmp_path):
    """NoisyReward artifacts carry a weights SHA-256: truncated or altered weights, or a broken manifest, fail clearly."""
    from rlstitch.stitch.noisy import NoisyReward

    net = NoisyReward(tiny_clip_reward, 4, (8, 8), seed=3)
    net.save(tmp_path / "nr")
    loaded = NoisyReward.load(tmp_path / "nr", tiny_clip_reward)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(loaded.embed(z, torch.full((2,), 0.5)), net.embed(z, torch.full((2,), 0.5)))
    w = tmp_path / "nr" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ValueError, match="weights.safetensors: missing, truncated or altered"):
        NoisyReward.load(tmp_path / "nr", tiny_clip_reward)
    (tmp_path / "nr" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not a NoisyReward manifest"):
        NoisyReward.load(tmp_path / "nr", tiny_clip_reward)


def test_building_a_noisy_reward_leaves_the_global_rng_alone(tiny_clip_reward):
    """Its seeded init must not reseed the caller's global RNG (a loaded baseline would make later draws repeat)."""
    from rlstitch.stitch.noisy import NoisyReward

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    NoisyReward(tiny_clip_reward, 4, (8, 8), seed=0)
    torch.testing.assert_close(torch.rand(3), expected)


def test_stitchvm_rejects_a_layer_for_another_reward_grid(tiny_clip_reward):
    """The reward tail takes any sequence length, so a stitch resampling onto another patch grid must fail here."""
    from rlstitch.stitch.vm import LatentTokens, StitchVM

    gh, gw = tiny_clip_reward.grid
    with pytest.raises(ValueError, match=rf"stitch layer grid_r \(4, 4\) does not match the reward's patch grid "
                                         rf"\({gh}, {gw}\)"):
        StitchVM(LatentTokens(4), tiny_clip_reward, StitchLayer(4, tiny_clip_reward.width, (8, 8), (4, 4)), i=1, j=0)
