"""The interleaved tasks the demo Flamingo (IDEFICS) model was trained on, built from a scene's labels.

A scene is described by its objects' ``"colour shape"`` labels, left to right (``truth.json``'s
``present_labels``). Two kinds of prompt, as lists of images and strings (``Captioner.generate``):

- few-shot captions: ``[image1, text1, image2, text2, image3]``, where the examples' texts set the style the
  model answers in for the last image: ``caption`` ("a red circle and a blue square"), ``colors`` ("red and
  blue") or ``shapes`` ("circle and square");
- questions that compare two images, question first: ``["Question: which image has more shapes?", image1,
  image2, "Answer:"]`` → ``image 1`` / ``image 2``; ``["Question: is the circle in image 1 the same color as the
  square in image 2?", image1, image2, "Answer:"]`` → ``yes`` / ``no``.

The training script (``examples/train_demo_models.py --idefics``), the tests and ``mmedge demo`` build prompts
here, so they are the same everywhere. Pure Python: this runs on the device.
"""

from __future__ import annotations

STYLES = ("caption", "colors", "shapes")
MORE_SHAPES = "Question: which image has more shapes?"
SAME_COLOR = "Question: is the {} in image 1 the same color as the {} in image 2?"
ANSWER = "Answer:"


def _listed(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def styled(labels: list[str], style: str) -> str:
    """The scene in ``style``: ``styled(["red circle", "blue square"], "colors")`` → ``"red and blue"``."""
    pairs = [label.split(" ") for label in labels]
    if style == "caption":
        return _listed([f"a {colour} {shape}" for colour, shape in pairs])
    if style == "colors":
        return _listed([colour for colour, _ in pairs])
    if style == "shapes":
        return _listed([shape for _, shape in pairs])
    raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def few_shot(examples: list[tuple], query, style: str) -> tuple[list, str]:
    """(prompt, expected answer): ``examples`` and ``query`` are ``(image, labels)`` pairs."""
    items: list = []
    for image, labels in examples:
        items += [image, styled(labels, style)]
    return items + [query[0]], styled(query[1], style)


def more_shapes(first, second) -> tuple[list, str]:
    """(prompt, answer) of "which image has more shapes?"; the two scenes' shape counts differ."""
    (a, a_labels), (b, b_labels) = first, second
    if len(a_labels) == len(b_labels):
        raise ValueError("the two scenes have as many shapes: the question has no answer")
    return [MORE_SHAPES, a, b, ANSWER], "image 1" if len(a_labels) > len(b_labels) else "image 2"


def same_color(first, second, shape1: str, shape2: str) -> tuple[list, str]:
    """(prompt, answer) of "is the <shape1> in image 1 the same color as the <shape2> in image 2?"."""
    (a, a_labels), (b, b_labels) = first, second
    colour1 = {label.split(" ")[1]: label.split(" ")[0] for label in a_labels}[shape1]
    colour2 = {label.split(" ")[1]: label.split(" ")[0] for label in b_labels}[shape2]
    return [SAME_COLOR.format(shape1, shape2), a, b, ANSWER], "yes" if colour1 == colour2 else "no"


def demo_prompts(pool: list[tuple], count: int) -> list[dict]:
    """Two prompts for each of the first ``count`` bundled scenes: a few-shot one (the next two scenes of ``pool`` as
    examples, the style turning with the scene's index) and a comparison with the next scene (more shapes when the
    counts differ, else the colour of its first shape against the other's last). ``pool``: ``(image, labels)`` pairs,
    at least three. Returns ``[{"task", "prompt", "answer"}]``."""
    if len(pool) < 3:
        raise ValueError("a few-shot prompt needs at least three scenes")
    out = []
    for i, query in enumerate(pool[:count]):
        style = STYLES[i % len(STYLES)]
        prompt, answer = few_shot([pool[(i + 1) % len(pool)], pool[(i + 2) % len(pool)]], query, style)
        out.append({"task": f"few-shot {style}", "prompt": prompt, "answer": answer})
        other = pool[(i + 1) % len(pool)]
        if len(query[1]) != len(other[1]):
            prompt, answer = more_shapes(query, other)
            out.append({"task": "more shapes", "prompt": prompt, "answer": answer})
        else:
            prompt, answer = same_color(query, other, query[1][0].split(" ")[1], other[1][-1].split(" ")[1])
            out.append({"task": "same color", "prompt": prompt, "answer": answer})
    return out
