"""Procedural scenes for the demo models: one to three coloured shapes on a plain background.

Every scene comes with its ground truth: a caption ("a red circle, a blue square and a green
cross", objects named left to right), a zero-shot label (the largest object's "colour shape") and
question/answer pairs ("what color is the circle?" → "red", "what shape is the red one?" →
"circle", "how many shapes are there?" → "two"). Colours and shapes are distinct within a scene,
so every question has one answer.

Scenes are seeded per split and index: ``split("test", 200)`` is the same 200 scenes on every
machine, and its first 50 are ``split("test", 50)``. Training, validation and test use different
seeds, so the held-out splits are never trained on.

This module is training and evaluation code: it ships in ``examples/``, not in the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # name → RGB; each drawn with a little jitter
    "red": (215, 45, 40),
    "green": (40, 175, 65),
    "blue": (45, 90, 230),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (6.0, 8.0), "large": (10.5, 13.0)}  # radius range in pixels at IMAGE_SIZE
NUMBERS = ("one", "two", "three")
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges
ROTATION = 12.0  # degrees, either way
SPLIT_SEEDS = {"train": 11, "validation": 22, "test": 33}
VQA_TEMPLATE = "Question: {} Answer:"


def labels() -> list[str]:
    """The zero-shot label set: every "colour shape" pair (24 labels)."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str  # "small" or "large"
    x: float  # centre, pixels at IMAGE_SIZE
    y: float
    radius: float
    angle: float  # degrees

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # left to right
    background: tuple[int, int, int]
    seed: tuple[int, ...]

    @property
    def caption(self) -> str:
        """"a red circle", "a red circle and a blue square", "a red circle, a blue square and a green cross"."""
        names = [f"a {s.colour} {s.shape}" for s in self.shapes]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    @property
    def label(self) -> str:
        """The largest object's "colour shape" (the only one in a one-shape scene)."""
        return max(self.shapes, key=lambda s: s.radius).label

    @property
    def present_labels(self) -> list[str]:
        return [s.label for s in self.shapes]

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs: colour of each shape, shape of each colour, and the count."""
        pairs = [(f"what color is the {s.shape}?", s.colour) for s in self.shapes]
        pairs += [(f"what shape is the {s.colour} one?", s.shape) for s in self.shapes]
        pairs.append(("how many shapes are there?", NUMBERS[len(self.shapes) - 1]))
        return pairs

    def render(self) -> Image.Image:
        """The scene as an RGB image of IMAGE_SIZE × IMAGE_SIZE pixels."""
        rng = np.random.default_rng((*self.seed, 1))
        big = IMAGE_SIZE * SUPERSAMPLE
        image = Image.new("RGB", (big, big), self.background)
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            jitter = rng.integers(-18, 19, size=3)
            fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[s.colour], jitter))
            draw.polygon(_outline(s, SUPERSAMPLE), fill=fill)
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3.0, (IMAGE_SIZE, IMAGE_SIZE, 1))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    def truth(self) -> dict:
        """Ground truth as JSON-ready data."""
        return {"caption": self.caption, "label": self.label, "present_labels": self.present_labels,
                "questions": [{"question": q, "answer": a} for q, a in self.questions()]}


def _outline(s: Shape, scale: float) -> list[tuple[float, float]]:
    """The shape's polygon (circles as 48-gons), rotated by its angle, in pixels at ``scale``."""
    r = s.radius
    if s.shape == "circle":
        points = [(r * math.cos(2 * math.pi * k / 48), r * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif s.shape == "square":
        h = r * 0.85
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif s.shape == "triangle":
        points = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        points = [(x, y + r * 0.15) for x, y in points]  # centre the triangle's bounding box
    elif s.shape == "cross":
        a, w = r, r * 0.36
        points = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
                  (-w, -w)]
    else:
        raise ValueError(f"unknown shape {s.shape!r}")
    turn = math.radians(s.angle)
    cos, sin = math.cos(turn), math.sin(turn)
    return [((s.x + x * cos - y * sin) * scale, (s.y + x * sin + y * cos) * scale) for x, y in points]


def make_scene(seed: tuple[int, ...], counts: tuple[int, ...] = (1, 2, 3)) -> Scene:
    """One scene drawn from ``seed``: ``counts`` says how many shapes it may have."""
    rng = np.random.default_rng(seed)
    count = int(rng.choice(counts))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    kinds = rng.choice(SHAPES, size=count, replace=False)
    placed: list[Shape] = []
    for colour, kind in zip(colours, kinds):
        for _ in range(1000):
            size = str(rng.choice(list(SIZES)))
            radius = float(rng.uniform(*SIZES[size]))
            x, y = rng.uniform(radius + 1, IMAGE_SIZE - radius - 1, size=2)
            if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 2 and abs(x - o.x) > 6 for o in placed):
                placed.append(Shape(str(colour), str(kind), size, float(x), float(y), radius,
                                    float(rng.uniform(-ROTATION, ROTATION))))
                break
        else:  # the canvas is too full: start over with a new draw from the same seed stream
            return make_scene((*seed, 0), counts)
    grey = int(rng.integers(25, 90))
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-10, 11, size=3))
    return Scene(tuple(sorted(placed, key=lambda s: s.x)), background, tuple(seed))


def split(name: str, count: int, counts: tuple[int, ...] = (1, 2, 3)) -> list[Scene]:
    """The first ``count`` scenes of split ``name`` ("train", "validation", "test")."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    key = SPLIT_SEEDS[name] * 10 + sum(1 << c for c in counts)  # other shape counts, other scenes
    return [make_scene((key, i), counts) for i in range(count)]


def questions_by_text(chosen: list[Scene]) -> dict[str, list[tuple[int, str]]]:
    """Every question of every scene, grouped by its text so each can be asked of its images in one batch:
    question → [(scene index, right answer)]."""
    asked: dict[str, list[tuple[int, str]]] = {}
    for index, scene in enumerate(chosen):
        for question, answer in scene.questions():
            asked.setdefault(question, []).append((index, answer))
    return asked


def question_kind(question: str) -> str:
    """"color", "shape" or "count"."""
    return "count" if question.startswith("how many") else "color" if "color" in question else "shape"


def save_images(scenes: list[Scene], folder: str | Path, prefix: str = "scene") -> list[Path]:
    """Write each scene as ``prefix-NN.png`` into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        path = folder / f"{prefix}-{i:02d}.png"
        scene.render().save(path, optimize=True)
        paths.append(path)
    return paths
