"""DiffusionBackbone: truncated features equal a full forward's activations; inputs are validated."""

from __future__ import annotations

import pytest
import torch


def _block_outputs(backbone, z, t, cond):
    """Image tokens after every block, captured by hooks during a full velocity forward."""
    m = backbone.model
    blocks = list(m.transformer_blocks) + list(getattr(m, "single_transformer_blocks", []))
    caps = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: caps.append(out[1])) for b in blocks]
    try:
        backbone.velocity(z, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return caps


def test_features_match_full_forward(random_backbone):
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    cond = random_backbone.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        caps = _block_outputs(random_backbone, z, 0.3, cond)
        assert len(caps) == random_backbone.num_blocks == 8
        for i in range(1, random_backbone.num_blocks + 1):
            f = random_backbone.features(z, 0.3, cond, upto=i)
            assert f.shape == (2, 64, random_backbone.hidden_dim)
            torch.testing.assert_close(f, caps[i - 1], atol=1e-5, rtol=1e-5)


def test_truncated_forward_skips_later_blocks(random_backbone):
    m = random_backbone.model
    blocks = list(m.transformer_blocks) + list(getattr(m, "single_transformer_blocks", []))
    ran = []
    hooks = [b.register_forward_hook(lambda mod, inp, out, k=k: ran.append(k)) for k, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            random_backbone.features(torch.randn(1, 4, 8, 8), 0.5, upto=3)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1, 2]


def test_velocity_shape_grid_and_time_convention(random_backbone):
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        v1 = random_backbone.velocity(z, torch.tensor([0.1, 0.5, 0.9]))
        v2 = random_backbone.velocity(z, 0.9)
    assert v1.shape == z.shape and v1.dtype == torch.float32
    assert random_backbone.grid((8, 8)) == (8, 8)
    # the time really enters the model: same latent, other t -> other velocity
    assert not torch.allclose(v1[0], v2[0])
    torch.testing.assert_close(v1[2], v2[2], atol=1e-5, rtol=1e-4)


def test_null_condition_is_empty_prompt(random_backbone):
    null = random_backbone.null_condition()
    ref = random_backbone.encode_prompts([""])
    torch.testing.assert_close(null.tokens, ref.tokens)
    assert null.batch_size == 1


@pytest.mark.parametrize(
    "z, t, match",
    [
        (torch.randn(2, 3, 8, 8), 0.5, "latent must be"),
        (torch.full((1, 4, 8, 8), float("nan")), 0.5, "NaN"),
        (torch.randn(1, 4, 8, 8), 1.5, r"t must lie in \[0, 1\]"),
        (torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.2, 0.3]), "t must be a scalar"),
    ],
)
def test_bad_inputs_raise_clear_errors(random_backbone, z, t, match):
    with pytest.raises(ValueError, match=match):
        random_backbone.velocity(z, t)


def test_bad_block_index(random_backbone):
    with pytest.raises(ValueError, match="upto must be in 1..8"):
        random_backbone.features(torch.randn(1, 4, 8, 8), 0.5, upto=9)


def test_features_all_is_one_pass_of_every_depth(random_backbone):
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        every = random_backbone.features_all(z, 0.4, upto=5)
        assert len(every) == 5
        torch.testing.assert_close(every[3], random_backbone.features(z, 0.4, upto=4))


def test_inputs_join_the_model_device(random_backbone):
    """CPU latents, times and conditions are moved to the transformer's device (a GPU in use; 'meta' here)."""
    import copy

    from rlstitch.models import FluxBackbone, SD3Backbone
    from rlstitch.models.condition import Condition

    model = copy.deepcopy(random_backbone.model).to("meta")
    if random_backbone.family == "sd3":
        bb = SD3Backbone(model)
    else:
        bb = FluxBackbone(model, pack=1)
    z, cond = torch.randn(2, 4, 8, 8), Condition(torch.zeros(1, 3, 64), torch.zeros(1, 64))
    with torch.no_grad():
        v = bb.velocity(z, torch.tensor([0.2, 0.7]), cond)
        f = bb.features(z, 0.5, cond, upto=2)
        every = bb.features_all(z, 0.5, upto=3)
    assert bb.device.type == "meta"
    assert v.device.type == f.device.type == "meta" and v.shape == z.shape and v.dtype == torch.float32
    assert f.shape == (2, 64, bb.hidden_dim) and len(every) == 3 and every[-1].device.type == "meta"
