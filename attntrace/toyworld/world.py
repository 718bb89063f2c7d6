"""The toy world: coloured shapes on plain or textured grey backgrounds, with captions and masks.

A scene holds one to three objects, each a distinct shape in a distinct colour, placed without
overlap. Its caption names every object by two words, colour then shape ("a red circle left of a
blue square"); the renderer returns each object's pixel mask next to those words, which is the
ground truth the semantic tests and the attribution benchmark score heat maps against.

Captions: one object "a red circle"; two objects "A REL B" where REL is `left of`, `right of`,
`above` or `below` (read off the layout); three objects "A and B and C", listed left to right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import ConfigError

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SIZE",
    "VOCABULARY",
    "Scene",
    "SceneObject",
    "ToyVocabularyError",
    "caption_for",
    "check_prompt",
    "parse_prompt",
    "render_scene",
    "sample_scene",
    "shape_mask",
]

SIZE = 32  # image side in pixels
# Colours far apart in RGB and all saturated, so backgrounds (grey) never pass for an object.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.13, 0.13),
    "green": (0.13, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.93, 0.85, 0.12),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
VOCABULARY: tuple[str, ...] = (
    "a", "and", "of", "left", "right", "above", "below", *COLOURS, *SHAPES,
)  # fmt: skip

# Object side (pixels) by number of objects in the scene: fewer objects, bigger ones.
_SIZES = {1: (11.0, 16.0), 2: (9.0, 13.0), 3: (8.0, 11.0)}
_N_OBJECTS_P = (0.3, 0.45, 0.25)


class ToyVocabularyError(ConfigError):
    """A prompt uses words the toy world's model was never trained on."""


@dataclass
class SceneObject:
    """One object: what it is, where it is, its pixel mask and the caption words naming it."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float
    mask: np.ndarray = field(repr=False)  # (SIZE, SIZE) bool

    @property
    def words(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    """A rendered scene: `image` is (H, W, 3) float32 in [0, 1]."""

    image: np.ndarray = field(repr=False)
    caption: str
    objects: list[SceneObject]
    background: str


def shape_mask(shape: str, cx: float, cy: float, size: float, side: int = SIZE) -> np.ndarray:
    """Boolean mask of `shape` centred at (cx, cy) (pixel units, x to the right) with side `size`."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    dx, dy, r = x - cx, y - cy, size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":  # a plus sign, arms a third of the side thick
        arm = size / 6
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A grey background: plain, striped, checked or smooth noise (no saturation, by construction)."""
    g = rng.uniform(0.2, 0.8)
    kind = rng.choice(["plain", "plain", "plain", "stripes", "checker", "noise"])
    if kind == "plain":
        return np.full((SIZE, SIZE), g, np.float32), "plain"
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    delta = rng.uniform(0.08, 0.2) * rng.choice([-1, 1])
    if kind == "stripes":
        period = int(rng.integers(4, 9))
        along = [x, y, x + y][int(rng.integers(3))]
        pattern = (along // (period // 2)) % 2
    elif kind == "checker":
        period = int(rng.integers(4, 9))
        pattern = ((x // (period // 2)) + (y // (period // 2))) % 2
    else:  # smooth noise: an upsampled 4x4 random grid
        coarse = rng.uniform(-1, 1, (5, 5))
        idx = np.linspace(0, 4, SIZE)
        i0 = np.clip(idx.astype(int), 0, 3)
        t = idx - i0
        rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
        pattern = rows[:, i0] * (1 - t)[None] + rows[:, i0 + 1] * t[None]
    img = np.clip(g + delta * pattern, 0.05, 0.95).astype(np.float32)
    return img, str(kind)


def caption_for(objects: list[SceneObject]) -> str:
    """The caption of a layout: objects named colour-then-shape, relation read off the positions."""
    names = [f"a {o.colour} {o.shape}" for o in objects]
    if len(objects) == 1:
        return names[0]
    if len(objects) == 2:
        a, b = objects
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dx) >= abs(dy):
            rel = "left of" if dx > 0 else "right of"
        else:
            rel = "above" if dy > 0 else "below"
        return f"{names[0]} {rel} {names[1]}"
    return " and ".join(names)


def render_scene(
    objects: list[tuple[str, str, float, float, float]],
    background: np.ndarray | None = None,
    background_kind: str = "plain",
) -> Scene:
    """Render (colour, shape, cx, cy, size) objects onto a background (default: plain mid grey)."""
    grey = np.full((SIZE, SIZE), 0.5, np.float32) if background is None else background
    img = np.repeat(grey[..., None], 3, axis=-1).copy()
    objs = []
    for colour, shape, cx, cy, size in objects:
        if colour not in COLOURS or shape not in SHAPES:
            raise ToyVocabularyError(f"unknown object {colour!r} {shape!r}")
        mask = shape_mask(shape, cx, cy, size)
        img[mask] = COLOURS[colour]
        objs.append(SceneObject(colour, shape, cx, cy, size, mask))
    return Scene(img, caption_for(objs), objs, background_kind)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: 1-3 objects of distinct shapes and colours, no overlaps, random background."""
    n = int(rng.choice([1, 2, 3], p=_N_OBJECTS_P)) if n_objects is None else n_objects
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    shapes = rng.choice(list(SHAPES), size=n, replace=False)
    lo, hi = _SIZES[n]
    for _ in range(200):
        placed: list[tuple[float, float, float]] = []
        for _k in range(n):
            s = float(rng.uniform(lo, hi))
            cx, cy = (float(v) for v in rng.uniform(1 + s / 2, SIZE - 1 - s / 2, size=2))
            placed.append((cx, cy, s))
        # boxes (with a 1-pixel gap) must not overlap
        ok = all(
            abs(a[0] - b[0]) > (a[2] + b[2]) / 2 + 1 or abs(a[1] - b[1]) > (a[2] + b[2]) / 2 + 1
            for i, a in enumerate(placed)
            for b in placed[i + 1 :]
        )
        if ok:
            break
    order = np.argsort([p[0] for p in placed]) if n == 3 else np.arange(n)  # 3 objects: left to right
    spec = [(str(colours[i]), str(shapes[i]), *placed[i]) for i in order]
    bg, kind = _background(rng)
    return render_scene(spec, bg, kind)


_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def check_prompt(prompt: str) -> list[str]:
    """The prompt's words, lower-cased; `ToyVocabularyError` names every word outside the vocabulary."""
    words = _WORD.findall(prompt.lower())
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ToyVocabularyError(
            f"prompt {prompt!r} has words outside the toy world's vocabulary: {', '.join(unknown)} "
            f"(known: {' '.join(VOCABULARY)})"
        )
    return words


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a prompt names, in order; checks the vocabulary first."""
    words = check_prompt(prompt)
    pairs = []
    for i, w in enumerate(words):
        if w in SHAPES:
            colour = words[i - 1] if i > 0 and words[i - 1] in COLOURS else ""
            pairs.append((colour, w))
    return pairs
