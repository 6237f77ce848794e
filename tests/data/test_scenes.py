"""TinyWorld data: determinism, caption grammar and aesthetic label statistics."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from rlstitch.data import scenes as tw

N_STATS = 2000  # samples for the label statistics; ~2 s to generate

_PHRASE = r"a (red|green|blue|yellow) (circle|square|triangle)"
_ONE = re.compile(r"^a (small|large) (red|green|blue|yellow) (circle|square|triangle)$")
_TWO = re.compile(rf"^{_PHRASE} (left of|above) {_PHRASE}$")
_THREE = re.compile(rf"^{_PHRASE}, {_PHRASE} and {_PHRASE}$")


@pytest.fixture(scope="module")
def train_samples() -> list[tw.Sample]:
    """The first N_STATS train samples, generated once for the statistics tests."""
    return [tw.sample(i) for i in range(N_STATS)]


def _kinds(objects) -> list[tuple[str, str]]:
    """Sorted (colour, shape) pairs of a scene, for multiset comparisons."""
    return sorted((o.colour, o.shape) for o in objects)


# --------------------------------------------------------------------------------------------- determinism


def test_same_key_gives_identical_sample() -> None:
    """(seed, split, index) fully determines pixels, caption, label and scene."""
    for split in ("train", "val", "test"):
        for i in (0, 1, 17, 4095):
            a, b = tw.sample(i, split, seed=3), tw.sample(i, split, seed=3)
            assert a.image.tobytes() == b.image.tobytes()
            assert (a.caption, a.aesthetic, a.objects, a.background) == (
                b.caption,
                b.aesthetic,
                b.objects,
                b.background,
            )


def test_splits_and_seeds_give_different_streams() -> None:
    """Disjoint split ids and seeds never reproduce each other's images."""
    for i in range(20):
        images = [tw.sample(i, s).image.tobytes() for s in ("train", "val", "test")]
        images.append(tw.sample(i, "train", seed=1).image.tobytes())
        assert len(set(images)) == 4


def test_caption_stream_is_stable() -> None:
    """Pinned captions: a change here silently invalidates every model trained on TinyWorld."""
    assert [tw.sample(i).caption for i in range(4)] == [
        "a green circle left of a green triangle",
        "a red circle left of a green square",
        "a green triangle left of a green circle",
        "a yellow circle, a yellow triangle and a green square",
    ]


def test_image_format() -> None:
    """Images are uint8 [32, 32, 3] and the batch helper stacks them."""
    b = tw.batch([0, 5, 9], "val")
    assert b["images"].dtype == np.uint8 and b["images"].shape == (3, 32, 32, 3)
    assert b["aesthetic"].dtype == np.float32 and b["aesthetic"].shape == (3,)
    assert b["captions"] == [tw.sample(i, "val").caption for i in (0, 5, 9)]
    np.testing.assert_array_equal(b["images"][1], tw.sample(5, "val").image)


def test_split_bounds() -> None:
    """val/test are fixed-size held-out sets and unknown splits are rejected."""
    with pytest.raises(IndexError):
        tw.sample(tw.SPLIT_SIZES["val"], "val")
    with pytest.raises(IndexError):
        tw.sample(-1)
    with pytest.raises(ValueError, match="unknown split"):
        tw.sample(0, "dev")
    tw.sample(10**8, "train")  # train is unlimited


# --------------------------------------------------------------------------------------------- scenes and captions


def test_scene_constraints(train_samples) -> None:
    """Objects are distinct, inside the frame, sized in range, and counts follow 0.3/0.4/0.3."""
    counts = np.bincount([len(s.objects) for s in train_samples], minlength=4)[1:] / len(train_samples)
    np.testing.assert_allclose(counts, tw.COUNT_PROBS, atol=0.05)
    lo, hi = tw.SIZE_RANGE
    for s in train_samples:
        kinds = [(o.colour, o.shape) for o in s.objects]
        assert len(set(kinds)) == len(kinds), s.objects
        for o in s.objects:
            assert lo <= o.size <= hi
            e = 0.85 * o.size if o.shape == "square" else o.size  # half-width of the drawn shape
            assert e <= o.cx <= 32 - e and e <= o.cy <= 32 - e, s.objects


def test_caption_grammar_matches_scene(train_samples) -> None:
    """Captions follow the grammar and describe the scene's objects, sizes and spatial order."""
    for s in train_samples[:600]:
        objs, cap = s.objects, s.caption
        assert set(cap.replace(",", "").split()) <= set(tw.CAPTION_WORDS), cap
        if len(objs) == 1:
            m = _ONE.match(cap)
            assert m, cap
            (o,) = objs
            assert m.group(1) == ("small" if o.size < tw.SIZE_MIDPOINT else "large")
            assert (m.group(2), m.group(3)) == (o.colour, o.shape)
        elif len(objs) == 2:
            m = _TWO.match(cap)
            assert m, cap
            first, rel, second = (m.group(1), m.group(2)), m.group(3), (m.group(4), m.group(5))
            assert sorted([first, second]) == _kinds(objs), cap
            a, b = objs
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            assert abs(dx - dy) >= tw.MIN_SEPARATION - 1e-9  # the relation is unambiguous
            axis = "cx" if dx > dy else "cy"
            assert rel == ("left of" if dx > dy else "above")
            lead = min(objs, key=lambda o: getattr(o, axis))
            assert first == (lead.colour, lead.shape), (cap, objs)
        else:
            m = _THREE.match(cap)
            assert m, cap
            listed = [(m.group(k), m.group(k + 1)) for k in (1, 3, 5)]
            xs = sorted(o.cx for o in objs)
            assert min(np.diff(xs)) >= tw.MIN_SEPARATION - 1e-9
            assert listed == [(o.colour, o.shape) for o in sorted(objs, key=lambda o: o.cx)], cap


def test_caption_words_are_in_scene(train_samples) -> None:
    """Every colour and shape word in a caption belongs to an object of the scene, and vice versa."""
    for s in train_samples[:600]:
        words = s.caption.replace(",", "").split()
        pairs = sorted(
            (w, words[k + 1]) for k, w in enumerate(words) if w in tw.COLOURS and k + 1 < len(words)
        )
        assert pairs == _kinds(s.objects), s.caption


def test_shapes_are_drawn_in_their_colour() -> None:
    """The pixel at each object's centre carries (nearly) the object's colour."""
    for i in range(50):
        s = tw.sample(i, "test")
        for o in s.objects:
            y, x = int(o.cy + 0.5 * o.size * (o.shape == "triangle")), int(o.cx)  # triangles are bottom-heavy
            assert np.abs(s.image[y, x].astype(int) - tw.COLOURS[o.colour]).max() <= 2, (s.caption, o)


# --------------------------------------------------------------------------------------------- aesthetic label


def test_aesthetic_spread_and_weak_caption_correlation(train_samples) -> None:
    """The label spreads (std >= 1) and barely depends on the number of objects."""
    a = np.array([s.aesthetic for s in train_samples])
    assert 0.0 <= a.min() and a.max() <= 10.0
    assert a.std() >= 1.0
    k = np.array([len(s.objects) for s in train_samples])
    means = [a[k == c].mean() for c in (1, 2, 3)]
    # The brief's bound is 1.5 std; the generator achieves far less, so guard at 0.5 std.
    assert max(means) - min(means) < 0.5 * a.std(), means
    sizes = np.array([s.objects[0].size for s in train_samples])
    single = k == 1
    small, large = a[single & (sizes < tw.SIZE_MIDPOINT)], a[single & (sizes >= tw.SIZE_MIDPOINT)]
    assert abs(small.mean() - large.mean()) < 0.5 * a.std()


def test_aesthetic_components(train_samples) -> None:
    """Components lie in [0, 1], reproduce the label, and the background-only part is well spread."""
    for s in train_samples[:200]:
        assert set(s.components) == set(tw.AESTHETIC_WEIGHTS)
        assert all(0.0 <= v <= 1.0 for v in s.components.values())
        assert s.aesthetic == pytest.approx(tw.aesthetic_score(s.components))
    bg_part = np.array(
        [
            sum(tw.AESTHETIC_WEIGHTS[k] * s.components[k] for k in ("lighting", "cleanliness"))
            for s in train_samples
        ]
    )
    assert bg_part.std() * 10 / 0.7 >= 0.6  # in label units, after the [0.15, 0.85] -> [0, 10] stretch


def test_clutter_lowers_the_label() -> None:
    """The same scene scores lower with pixel noise and a gradient than on a clean, flat background."""
    for i in range(10):
        s = tw.sample(i, "test")
        clean = dataclasses.replace(s.background, gradient="none", gradient_strength=0.0, noise_sigma=0.0)
        noisy = dataclasses.replace(
            s.background, gradient="vertical", gradient_strength=0.35, noise_sigma=14.0
        )
        rng = np.random.default_rng(0)
        image, comps = tw.render(s.objects, clean, rng)
        _, noisy_comps = tw.render(s.objects, noisy, rng)
        assert tw.aesthetic_score(noisy_comps) < tw.aesthetic_score(comps) - 1.0
        if s.background == clean:  # an already-clean sample re-renders to the same pixels
            np.testing.assert_array_equal(image, s.image)


# --------------------------------------------------------------------------------------------- tensors and dataset


def test_tensor_round_trip() -> None:
    """to_tensor gives float [B, 3, 32, 32] in [-1, 1]; from_tensor inverts it exactly."""
    images = tw.batch(range(4), "val")["images"]
    x = tw.to_tensor(images)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(tw.from_tensor(x), images)
    assert tw.to_tensor(images[0]).shape == (3, 32, 32)


def test_dataset() -> None:
    """The map-style dataset returns (tensor, caption, label) matching sample()."""
    assert len(tw.TinyWorldDataset()) == 10**9
    assert len(tw.TinyWorldDataset("val")) == tw.SPLIT_SIZES["val"]
    ds = tw.TinyWorldDataset("val", length=8)
    x, cap, a = ds[3]
    s = tw.sample(3, "val")
    assert x.shape == (3, 32, 32) and cap == s.caption and a == s.aesthetic
    with pytest.raises(IndexError):
        ds[8]
    with pytest.raises(ValueError):
        tw.TinyWorldDataset("test", length=tw.SPLIT_SIZES["test"] + 1)
