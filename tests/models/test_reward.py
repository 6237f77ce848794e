"""PixelReward: prefix + tail equals the full embedding, gradients reach pixels and latents."""

from __future__ import annotations

import pytest
import torch


def test_prefix_tail_equals_full_embedding(tiny_clip_reward):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        full = tiny_clip_reward.clip.encode_image(tiny_clip_reward.preprocess(x))
        for j in range(tiny_clip_reward.num_blocks + 1):
            tokens = tiny_clip_reward.prefix(x, j)
            assert tokens.shape == (2, 65, tiny_clip_reward.width)
            torch.testing.assert_close(tiny_clip_reward.tail(tokens, j), full, atol=1e-5, rtol=1e-5)


def test_preprocess_resizes_differentiably(tiny_clip_reward):
    x = (torch.rand(1, 3, 48, 48) * 2 - 1).requires_grad_(True)
    s = tiny_clip_reward.score(x, ["a red circle"])
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_text_embedding_matches_open_clip(tiny_clip_reward):
    prompts = ["a red circle", "a blue square left of a red circle"]
    ref = tiny_clip_reward.clip.encode_text(tiny_clip_reward.tokenizer(prompts))
    torch.testing.assert_close(tiny_clip_reward.embed_text(prompts), ref, atol=1e-5, rtol=1e-5)


def test_score_is_cosine_and_needs_one_prompt_per_image(tiny_clip_reward):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    s = tiny_clip_reward.score(x, ["a red circle", "a blue square"])
    assert s.shape == (2,) and bool((s.abs() <= 1).all())
    with pytest.raises(ValueError, match="one prompt per image"):
        tiny_clip_reward.score(x, ["a red circle"])


def test_reward_gradient_reaches_latent(tiny_clip_reward):
    from rlstitch.models.codec import LatentCodec
    from rlstitch.tinyworld import models as tm

    codec = LatentCodec(tm.build("vae", seed=0).eval())
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    tiny_clip_reward.score(codec.decode(z), ["a red circle", "a blue square"]).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_aesthetic_head_scores_normalised_embedding(tiny_clip_reward):
    from rlstitch.models.reward import AestheticMLP, AestheticReward

    head = AestheticMLP(64, (32, 16, 8)).eval()
    r = AestheticReward(tiny_clip_reward.clip, tiny_clip_reward.tokenizer, head).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    emb = r.embed_image(x)
    torch.testing.assert_close(r.score(x), head(emb / emb.norm(dim=-1, keepdim=True)))
    torch.testing.assert_close(r.score_embedding(2 * emb), r.score_embedding(emb))  # scale-invariant


def test_prefix_all_matches_prefix(tiny_clip_reward):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        every = tiny_clip_reward.prefix_all(x, 3)
        assert len(every) == 4
        for j, tok in enumerate(every):
            torch.testing.assert_close(tok, tiny_clip_reward.prefix(x, j))
        emb, toks = tiny_clip_reward.tail(every[2], 2, return_tokens=True)
        assert toks.shape == (2, 65, tiny_clip_reward.width)
        torch.testing.assert_close(emb, tiny_clip_reward.embed_image(x))


def test_tail_module_copies_reward_tail(tiny_clip_reward):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for j in (0, 2, 6):
        tail = tiny_clip_reward.tail_module(j)
        assert len(tail.blocks) == tiny_clip_reward.num_blocks - j
        with torch.no_grad():
            emb, toks = tail(tiny_clip_reward.prefix(x, j))
            ref, ref_toks = tiny_clip_reward.tail(tiny_clip_reward.prefix(x, j), j, return_tokens=True)
        torch.testing.assert_close(emb, ref)
        torch.testing.assert_close(toks, ref_toks)
        assert tail.proj.data_ptr() != tiny_clip_reward.visual.proj.data_ptr()  # a copy, not a view


def test_normalisation_buffers_follow_the_tower_device(tiny_clip_reward):
    """A reward wrapped around a tower on another device (a GPU in use; 'meta' here) normalises there too."""
    import copy

    from rlstitch.models.reward import ClipReward

    reward = ClipReward(copy.deepcopy(tiny_clip_reward.clip).to("meta"), tiny_clip_reward.tokenizer)
    assert reward.mean.device.type == reward.std.device.type == "meta"


def test_cpu_images_join_the_tower_device(tiny_clip_reward):
    """Images on the CPU are moved to the tower's device (a GPU in use; 'meta' here) before normalising."""
    import copy

    reward = copy.deepcopy(tiny_clip_reward).to("meta")
    with torch.no_grad():
        emb = reward.embed_image(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert emb.device.type == "meta" and emb.shape == (2, 64)


def test_text_cache_follows_a_moved_reward(tiny_clip_reward):
    """Cached text embeddings of a frozen tower do not stay behind on the old device or dtype."""
    import copy

    reward = copy.deepcopy(tiny_clip_reward).requires_grad_(False)
    with torch.no_grad():
        reward.embed_text(["a red circle"])
        reward.to(torch.float64)
        assert reward.embed_text(["a red circle"]).dtype == torch.float64
        reward.to("meta")
        assert reward.embed_text(["a red circle"]).device.type == "meta"


def test_aesthetic_head_in_half_precision(tiny_clip_reward):
    """A bf16 aesthetic reward (load_reward(..., dtype=torch.bfloat16)) scores in float32 instead of failing."""
    import copy

    from rlstitch.models.reward import AestheticMLP, AestheticReward

    head = AestheticMLP(64, (32, 16, 8)).eval()
    ref = AestheticReward(tiny_clip_reward.clip, tiny_clip_reward.tokenizer, head).eval()
    r = AestheticReward(copy.deepcopy(tiny_clip_reward.clip).to(torch.bfloat16), tiny_clip_reward.tokenizer,
                        copy.deepcopy(head).to(torch.bfloat16)).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        s = r.score(x)
        assert s.dtype == torch.float32 and s.shape == (3,)
        torch.testing.assert_close(s, ref.score(x), atol=0.1, rtol=0.1)
