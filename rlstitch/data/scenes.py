"""TinyWorld: procedural 32x32 scenes of coloured shapes, with captions and an image-defined aesthetic label.

Every sample is a pure function of ``(seed, split, index)``: nothing is cached or stored, so any process
(trainer, Ray actor, evaluator) regenerates exactly the same pixels, caption and label.

Scene
    One to three objects (probabilities 0.3 / 0.4 / 0.3), each a (colour, shape) pair from
    {red, green, blue, yellow} x {circle, square, triangle}; no two objects in a scene share both colour and
    shape.  ``size`` is the circle radius / triangle half-extent in pixels, in [4, 8] (squares are drawn with
    half-side ``0.85 * size`` so their area matches a circle's).  The background is a muted HSV colour,
    optionally with a horizontal or vertical brightness gradient and optionally with Gaussian pixel noise
    ("clutter").  Shapes are anti-aliased by drawing at 4x resolution and box-downsampling the coverage mask.

Captions (deterministic from the scene)
    1 object:  "a small red circle" / "a large red circle"  (small iff size < 6, the midpoint of the range)
    2 objects: "a red circle left of a blue square" when |dx| > |dy| (first = left object), otherwise
               "a red circle above a blue square" (first = upper object); placement guarantees
               ||dx| - |dy|| >= 4 px so the relation is unambiguous.
    3 objects: "a red circle, a blue square and a green triangle", listed left to right (x-centres differ
               by >= 4 px).

The aesthetic label is documented in :func:`aesthetic_score`.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # 4x keeps edges clean at 32 px and drawing a 128x128 mask is still microseconds
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_RANGE: tuple[float, float] = (4.0, 8.0)
_SQUARE_SCALE = 0.85  # square half-side / size, so a square's area roughly matches a circle's
SIZE_MIDPOINT = 0.5 * (SIZE_RANGE[0] + SIZE_RANGE[1])
SIZE_WORDS: tuple[str, ...] = ("small", "large")
RELATION_WORDS: tuple[str, ...] = ("left of", "above")
COUNT_PROBS: tuple[float, float, float] = (0.3, 0.4, 0.3)
_COUNT_CDF = np.cumsum(COUNT_PROBS)[:-1]
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted({"a", "and", "left", "of", "above", *SIZE_WORDS, *COLOURS, *SHAPES})
)
# Minimum ||dx| - |dy|| (2 objects) or x-gap (3 objects), in px, that keeps captions unambiguous.
MIN_SEPARATION = 4.0

# Disjoint split ids feed the SeedSequence entropy, so the three streams can never coincide.
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# val/test are fixed held-out sets of this many indices; train is unlimited.
SPLIT_SIZES: dict[str, int | None] = {"train": None, "val": 4096, "test": 4096}

_OBJECT_TYPES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
_LUMA = np.array([0.2126, 0.7152, 0.0722])
_COLOUR_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0] for name, rgb in COLOURS.items()}
_COLOUR_LUMA = {name: float(np.array(rgb) / 255.0 @ _LUMA) for name, rgb in COLOURS.items()}

# Background parameter ranges (muted: low saturation, mid brightness).
_BG_SAT = (0.05, 0.35)
_BG_VAL = (0.25, 0.85)
_GRAD_PROB, _GRAD_MAX = 0.5, 0.4
_NOISE_PROB, _NOISE_MAX = 0.5, 16.0

# Aesthetic weights; they sum to 1, so the weighted sum lies in [0, 1] before the stretch below.
AESTHETIC_WEIGHTS: dict[str, float] = {
    "symmetry": 0.20,
    "centring": 0.15,
    "contrast": 0.20,
    "harmony": 0.10,
    "lighting": 0.15,
    "cleanliness": 0.20,
}
# The weighted sum concentrates in ~[0.2, 0.8]; this affine stretch spreads it over [0, 10] (std ~1.3).
_AESTHETIC_LOW, _AESTHETIC_HIGH = 0.15, 0.85


@dataclass(frozen=True)
class SceneObject:
    """One shape: colour and shape words, centre (px, continuous coordinates in [0, 32]) and size (px)."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Background:
    """Background parameters: HSV base colour, gradient direction/strength and noise sigma (0-255 units)."""

    hue: float
    saturation: float
    value: float
    gradient: str  # "none", "horizontal" (changes along x) or "vertical" (changes along y)
    gradient_strength: float  # signed relative brightness change across the image
    noise_sigma: float


@dataclass
class Sample:
    """One generated sample: image, caption, aesthetic label and the scene that produced them."""

    image: np.ndarray  # uint8 [32, 32, 3]
    caption: str
    aesthetic: float
    objects: tuple[SceneObject, ...]
    background: Background
    components: dict[str, float] = field(default_factory=dict)  # aesthetic terms, each in [0, 1]
    split: str = "train"
    index: int = 0
    seed: int = 0


# --------------------------------------------------------------------------------------------- seeding


def check_split_index(split: str, index: int) -> None:
    """Validate the split name and that the index lies inside the split's fixed size."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    size = SPLIT_SIZES[split]
    if index < 0 or (size is not None and index >= size):
        raise IndexError(f"index {index} out of range for split {split!r} (size {size})")


def sample_rng(index: int, split: str = "train", seed: int = 0) -> np.random.Generator:
    """Return the generator for (seed, split, index); SeedSequence mixes the entropy so nearby keys decorrelate."""
    check_split_index(split, index)
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))


# --------------------------------------------------------------------------------------------- scene


def _sample_count(rng: np.random.Generator) -> int:
    """Draw the number of objects (1, 2 or 3)."""
    # Inverse-CDF on one uniform: Generator.choice with p= costs ~50 us per call.
    return int(np.searchsorted(_COUNT_CDF, rng.random(), side="right")) + 1


def _sample_sizes(rng: np.random.Generator, k: int) -> np.ndarray:
    """Draw object sizes; single objects avoid the midpoint +-0.5 so the small/large word is clear-cut."""
    lo, hi = SIZE_RANGE
    if k == 1:
        large = rng.random() < 0.5
        a, b = (SIZE_MIDPOINT + 0.5, hi) if large else (lo, SIZE_MIDPOINT - 0.5)
        return np.array([a + rng.random() * (b - a)])
    return lo + rng.random(k) * (hi - lo)


def _extents(shapes: Sequence[str], r: np.ndarray) -> np.ndarray:
    """Half-width of each object's bounding box (squares are drawn at 0.85 * size)."""
    return np.array([_SQUARE_SCALE * s if shape == "square" else s for shape, s in zip(shapes, r)])


def _layout_ok(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, shapes: Sequence[str]) -> np.ndarray:
    """Vectorised constraint check over candidate layouts [M, k]: no big overlap, unambiguous relations."""
    k = cx.shape[1]
    e = _extents(shapes, r)
    ok = np.ones(cx.shape[0], dtype=bool)
    for i in range(k):
        for j in range(i + 1, k):
            dx, dy = cx[:, i] - cx[:, j], cy[:, i] - cy[:, j]
            # Bounding boxes may touch but not overlap: squares and triangles fill their box corners, so a
            # centre-distance test alone would let them stack.
            apart = np.maximum(np.abs(dx), np.abs(dy)) >= e[i] + e[j]
            if shapes[i] == shapes[j] == "circle":
                apart |= np.hypot(dx, dy) >= r[i] + r[j] - 0.5  # round shapes may sit diagonally closer
            ok &= apart
            if k == 2:
                ok &= np.abs(np.abs(dx) - np.abs(dy)) >= MIN_SEPARATION
            else:
                ok &= np.abs(dx) >= MIN_SEPARATION
    return ok


def _fallback_layout(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed, always-valid layout of minimum-size objects, used only if rejection sampling fails."""
    r = np.full(k, SIZE_RANGE[0])
    xs = {1: [16.0], 2: [9.0, 23.0], 3: [6.0, 16.0, 26.0]}[k]
    return np.array(xs), np.full(k, 16.0), r


def _sample_layout(
    rng: np.random.Generator, shapes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rejection-sample centres (and shrink sizes if needed) so shapes fit, barely overlap and read clearly."""
    k = len(shapes)
    r = _sample_sizes(rng, k)
    candidates = 32
    for _ in range(8):
        e = _extents(shapes, r)
        lo, hi = e + 0.5, IMAGE_SIZE - e - 0.5  # whole shape inside the frame
        # Quarter-pixel grid: exact in the 4x supersampled canvas, and constraints are checked after rounding.
        cx = np.round((lo + rng.random((candidates, k)) * (hi - lo)) * 4) / 4
        cy = np.round((lo + rng.random((candidates, k)) * (hi - lo)) * 4) / 4
        ok = np.flatnonzero(_layout_ok(cx, cy, r, shapes))
        if ok.size:
            return cx[ok[0]], cy[ok[0]], r
        # Three large shapes may not fit in 32x32; shrink towards the minimum size and retry.
        r = np.maximum(SIZE_RANGE[0], r * 0.9)
    return _fallback_layout(k)


def _sample_objects(rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """Draw the objects of a scene: distinct (colour, shape) types, sizes and positions."""
    k = _sample_count(rng)
    types = rng.choice(len(_OBJECT_TYPES), size=k, replace=False)  # no two identical objects
    kinds = [_OBJECT_TYPES[t] for t in types]
    cx, cy, r = _sample_layout(rng, [shape for _, shape in kinds])
    return tuple(
        SceneObject(colour, shape, cx=float(x), cy=float(y), size=round(float(s), 3))
        for (colour, shape), x, y, s in zip(kinds, cx, cy, r)
    )


def _sample_background(rng: np.random.Generator) -> Background:
    """Draw the muted background colour, optional gradient and optional pixel noise."""
    hue = float(rng.random())
    sat = float(_BG_SAT[0] + rng.random() * (_BG_SAT[1] - _BG_SAT[0]))
    val = float(_BG_VAL[0] + rng.random() * (_BG_VAL[1] - _BG_VAL[0]))
    gradient, strength = "none", 0.0
    if rng.random() < _GRAD_PROB:
        gradient = "horizontal" if rng.random() < 0.5 else "vertical"
        strength = float((0.1 + rng.random() * (_GRAD_MAX - 0.1)) * rng.choice([-1.0, 1.0]))
    noise = float(2.0 + rng.random() * (_NOISE_MAX - 2.0)) if rng.random() < _NOISE_PROB else 0.0
    return Background(hue, sat, val, gradient, strength, noise)


# --------------------------------------------------------------------------------------------- rendering


def _render_background(bg: Background, rng: np.random.Generator) -> np.ndarray:
    """Render the background as float RGB in [0, 1], shape [32, 32, 3]."""
    base = np.array(colorsys.hsv_to_rgb(bg.hue, bg.saturation, bg.value))
    ramp = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE - 0.5  # -0.5 .. 0.5 across the image
    gain = np.ones((IMAGE_SIZE, IMAGE_SIZE))
    if bg.gradient == "horizontal":
        gain = gain + bg.gradient_strength * ramp[None, :]
    elif bg.gradient == "vertical":
        gain = gain + bg.gradient_strength * ramp[:, None]
    img = gain[..., None] * base[None, None, :]
    if bg.noise_sigma > 0:
        img = img + rng.normal(0.0, bg.noise_sigma / 255.0, img.shape)
    return np.clip(img, 0.0, 1.0)


def _shape_mask(obj: SceneObject) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1], shape [32, 32], drawn at SUPERSAMPLE x and box-filtered down."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = obj.cx * s, obj.cy * s
    r = obj.size * s
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=255)
    elif obj.shape == "square":
        h = _SQUARE_SCALE * r
        draw.rectangle([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=255)
    else:
        draw.polygon([(cx, cy - r), (cx + r - 1, cy + r - 1), (cx - r, cy + r - 1)], fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _composite(
    background: np.ndarray, objects: Sequence[SceneObject], masks: Sequence[np.ndarray]
) -> np.ndarray:
    """Alpha-composite the shapes over the background and quantise to uint8."""
    img = background.copy()
    for obj, m in zip(objects, masks):
        colour = np.array(COLOURS[obj.colour]) / 255.0
        img = img * (1.0 - m[..., None]) + colour[None, None, :] * m[..., None]
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- captions


def _phrase(obj: SceneObject) -> str:
    """Noun phrase for one object, e.g. "a red circle"."""
    return f"a {obj.colour} {obj.shape}"


def caption_for(objects: Sequence[SceneObject]) -> str:
    """Deterministic caption of a scene (grammar in the module docstring)."""
    if len(objects) == 1:
        (obj,) = objects
        word = "small" if obj.size < SIZE_MIDPOINT else "large"
        return f"a {word} {obj.colour} {obj.shape}"
    if len(objects) == 2:
        a, b = objects
        if abs(a.cx - b.cx) > abs(a.cy - b.cy):
            first, second = sorted(objects, key=lambda o: o.cx)
            return f"{_phrase(first)} left of {_phrase(second)}"
        first, second = sorted(objects, key=lambda o: o.cy)  # image y grows downwards: smaller cy is upper
        return f"{_phrase(first)} above {_phrase(second)}"
    if len(objects) == 3:
        a, b, c = sorted(objects, key=lambda o: o.cx)
        return f"{_phrase(a)}, {_phrase(b)} and {_phrase(c)}"
    raise ValueError(f"scenes have 1 to 3 objects, got {len(objects)}")


# --------------------------------------------------------------------------------------------- aesthetic


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Relative luminance of float RGB in [0, 1] (last axis = channels)."""
    return rgb @ _LUMA


def aesthetic_components(
    image: np.ndarray,
    background: np.ndarray,
    objects: Sequence[SceneObject],
    masks: Sequence[np.ndarray],
    bg: Background,
) -> dict[str, float]:
    """Compute the six aesthetic terms, each in [0, 1]; see :func:`aesthetic_score` for the formulas."""
    img = image.astype(np.float64) / 255.0
    mirror_err = float(np.abs(img - img[:, ::-1]).mean())
    symmetry = float(np.exp(-mirror_err / 0.08))

    area = np.array([m.sum() for m in masks])
    cx = float(np.dot(area, [o.cx for o in objects]) / area.sum())
    cy = float(np.dot(area, [o.cy for o in objects]) / area.sum())
    centring = float(max(0.0, 1.0 - np.hypot(cx - 16.0, cy - 16.0) / 12.0))

    bg_luma = _luma(background)
    diffs = [
        abs(_COLOUR_LUMA[o.colour] - float((bg_luma * m).sum() / m.sum())) for o, m in zip(objects, masks)
    ]
    contrast = float(min(1.0, np.mean(diffs) / 0.5))

    # Hue distance on the circle, 0 = same hue, 1 = complementary; muted backgrounds count less.
    hue_gap = [(1.0 - np.cos(2 * np.pi * (_COLOUR_HUES[o.colour] - bg.hue))) / 2.0 for o in objects]
    harmony = float(np.mean(hue_gap))

    lighting = float(max(0.0, 1.0 - abs(bg.value - 0.55) / 0.3))

    cleanliness = float(1.0 - 0.6 * bg.noise_sigma / _NOISE_MAX - 0.4 * abs(bg.gradient_strength) / _GRAD_MAX)
    return {
        "symmetry": symmetry,
        "centring": centring,
        "contrast": contrast,
        "harmony": harmony,
        "lighting": lighting,
        "cleanliness": max(0.0, cleanliness),
    }


def aesthetic_score(components: dict[str, float]) -> float:
    """Weighted aesthetic label in [0, 10]: ``10 * clip((raw - 0.15) / 0.7, 0, 1)``, ``raw = sum_k w_k c_k``.

    Components (each in [0, 1]), computed from the rendered image and the scene layout:
      symmetry    = exp(-mean|I - fliplr(I)| / 0.08), I the final image in [0, 1] (noise lowers it too)
      centring    = 1 - min(1, |area-weighted mean shape centre - image centre| / 12 px)
      contrast    = min(1, mean_k |luma(colour_k) - mean luma of the background under shape k| / 0.5)
      harmony     = mean_k (1 - cos(2 pi (hue_k - hue_bg))) / 2   (complementary hues score 1)
      lighting    = 1 - min(1, |V_bg - 0.55| / 0.3)               (mid-bright backgrounds preferred)
      cleanliness = 1 - 0.6 * noise_sigma / 16 - 0.4 * |gradient_strength| / 0.4
    Weights: symmetry 0.20, centring 0.15, contrast 0.20, harmony 0.10, lighting 0.15, cleanliness 0.20.
    Lighting and cleanliness depend only on the background, which no caption mentions.
    """
    raw = sum(AESTHETIC_WEIGHTS[k] * components[k] for k in AESTHETIC_WEIGHTS)
    return float(10.0 * np.clip((raw - _AESTHETIC_LOW) / (_AESTHETIC_HIGH - _AESTHETIC_LOW), 0.0, 1.0))


# --------------------------------------------------------------------------------------------- public API


def render(
    objects: Sequence[SceneObject], bg: Background, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """Render a scene (``rng`` draws the pixel noise) and return (uint8 image, aesthetic components).

    Public so callers can build counterfactual scenes, e.g. the same layout on a cleaner background.
    """
    objects = tuple(objects)
    background = _render_background(bg, rng)
    masks = [_shape_mask(o) for o in objects]
    image = _composite(background, objects, masks)
    return image, aesthetic_components(image, background, objects, masks, bg)


def sample(index: int, split: str = "train", seed: int = 0) -> Sample:
    """Generate sample ``index`` of ``split``; a pure function of (seed, split, index)."""
    rng = sample_rng(index, split, seed)
    objects = _sample_objects(rng)
    bg = _sample_background(rng)
    image, comps = render(objects, bg, rng)
    return Sample(
        image=image,
        caption=caption_for(objects),
        aesthetic=aesthetic_score(comps),
        objects=objects,
        background=bg,
        components=comps,
        split=split,
        index=int(index),
        seed=int(seed),
    )


def batch(indices: Sequence[int], split: str = "train", seed: int = 0) -> dict:
    """Generate several samples: ``images`` uint8 [B, 32, 32, 3], ``captions`` list[str], ``aesthetic`` float32 [B]."""
    samples = [sample(int(i), split, seed) for i in indices]
    return {
        "images": np.stack([s.image for s in samples]) if samples else np.zeros((0, 32, 32, 3), np.uint8),
        "captions": [s.caption for s in samples],
        "aesthetic": np.array([s.aesthetic for s in samples], dtype=np.float32),
    }


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert uint8 images [B, H, W, 3] (or one [H, W, 3]) to float32 [B, 3, H, W] (or [3, H, W]) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float()
    t = t.movedim(-1, -3)  # channels-last -> channels-first, for one image or a batch
    return t / 127.5 - 1.0


def from_tensor(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: float [.., 3, H, W] in [-1, 1] to uint8 [.., H, W, 3]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.movedim(-3, -1).to(torch.uint8).numpy()


class TinyWorldDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i is (image float [3, 32, 32] in [-1, 1], caption, aesthetic) of ``sample(i)``."""

    def __init__(self, split: str = "train", length: int | None = None, seed: int = 0) -> None:
        """Wrap ``split``; ``length`` defaults to the split size (10**9 for the unlimited train split)."""
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
        size = SPLIT_SIZES[split]
        self.split, self.seed = split, seed
        self.length = int(length if length is not None else (size if size is not None else 10**9))
        if size is not None and self.length > size:
            raise ValueError(f"length {self.length} exceeds the fixed size {size} of split {split!r}")

    def __len__(self) -> int:
        """Number of items."""
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, float]:
        """Generate item ``i``."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for dataset of length {self.length}")
        s = sample(int(i), self.split, self.seed)
        return to_tensor(s.image), s.caption, s.aesthetic
