"""Built-in synthetic image tasks for the tiny vision-language model (``mixture.builtin.suite: vision``).

Every task draws a small picture with Pillow (56×56 by default: 4×4 patches of 14 pixels, merged 2×2
into 4 image tokens for the tiny Qwen2.5-VL) and asks one question about it; the answer is a
deterministic function of the drawing, so evaluation is exact match (or multiple choice for the
``*_choice`` tasks, which carry ``choices`` and ``answer_index``).

Families: colours, shapes, counts, positions, sizes, textures, reading rendered letters, brightness,
comparisons. Conflict pairs (``CONFLICT_PAIRS``) draw the same pictures and ask the same question through
one helper, but answer in systematically different words (lower vs upper case, digits vs number words,
left/right vs west/east), so the contradiction survives averaging gradients over a source (see the
design notes on planted conflicts).

``WARMUP_TASKS`` are separate tasks (their own prompts and pictures) used to make the tiny model's θ(0)
know the chat format and basic perception before the target mixture, like the text preset's warm-up.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["VisionTask", "TASKS", "WARMUP_TASKS", "CONFLICT_PAIRS", "SIZE", "write_vision_mixture"]

SIZE = 56  # pixels per side: a multiple of 28 (patch 14 × merge 2)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABEHKOSX"
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)

# (picture, prompt, answer, extra fields such as choices / answer_index)
Sample = tuple[Image.Image, str, str, dict]


@dataclass(frozen=True)
class VisionTask:
    name: str
    family: str
    generate: Callable[[random.Random], Sample]


TASKS: dict[str, VisionTask] = {}
WARMUP_TASKS: dict[str, VisionTask] = {}


def _task(table: dict[str, VisionTask], name: str, family: str):
    def register(fn: Callable[[random.Random], Sample]):
        if name in table:
            raise ValueError(f"duplicate task name {name!r}")
        table[name] = VisionTask(name, family, fn)
        return fn

    return register


def _target(name: str, family: str):
    return _task(TASKS, name, family)


def _warmup(name: str):
    return _task(WARMUP_TASKS, name, "warmup")


# ------------------------------------------------------------------------------------------------ drawing


def _canvas(colour=WHITE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), colour)
    return img, ImageDraw.Draw(img)


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _box(rng: random.Random, size: int, x_range=(4, SIZE - 4), y_range=(4, SIZE - 4)) -> tuple[int, int, int, int]:
    x0 = rng.randint(x_range[0], max(x_range[0], x_range[1] - size))
    y0 = rng.randint(y_range[0], max(y_range[0], y_range[1] - size))
    return x0, y0, x0 + size, y0 + size


def _font(size: int):
    return ImageFont.load_default(size=size)


def _image_part(prompt: str) -> list[dict]:
    return [{"type": "image"}, {"type": "text", "text": prompt}]


# ----------------------------------------------------------- shared draws for conflict pairs (same RNG use)


def _draw_coloured_shape(rng: random.Random) -> tuple[Image.Image, str]:
    colour = rng.choice(list(COLOURS))
    img, draw = _canvas()
    _shape(draw, rng.choice(SHAPES), _box(rng, rng.randint(18, 34)), COLOURS[colour])
    return img, colour


def _draw_dots(rng: random.Random) -> tuple[Image.Image, int]:
    n = rng.randint(1, 5)
    img, draw = _canvas()
    cells = rng.sample(range(9), n)  # a 3×3 grid of cells keeps dots apart
    for c in cells:
        cx, cy = 10 + (c % 3) * 18 + rng.randint(-2, 2), 10 + (c // 3) * 18 + rng.randint(-2, 2)
        draw.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=BLACK)
    return img, n


def _draw_side(rng: random.Random) -> tuple[Image.Image, bool]:
    left = rng.random() < 0.5
    img, draw = _canvas()
    x = rng.randint(4, SIZE // 2 - 16) if left else rng.randint(SIZE // 2 + 4, SIZE - 16)
    y = rng.randint(4, SIZE - 16)
    draw.ellipse((x, y, x + 12, y + 12), fill=COLOURS[rng.choice(list(COLOURS))])
    return img, left


# ---------------------------------------------------------------------------------------------- targets


@_target("shape_colour", "colours")
def _shape_colour(rng):
    img, colour = _draw_coloured_shape(rng)
    return img, "What colour is the shape?", colour, {}


@_target("shape_colour_caps", "colours")
def _shape_colour_caps(rng):
    img, colour = _draw_coloured_shape(rng)
    return img, "What colour is the shape?", colour.upper(), {}


@_target("background", "colours")
def _background(rng):
    colour = rng.choice(list(COLOURS))
    img, draw = _canvas(COLOURS[colour])
    _shape(draw, rng.choice(SHAPES), _box(rng, rng.randint(10, 18)), rng.choice([WHITE, BLACK]))
    return img, "What colour is the background?", colour, {}


@_target("colour_choice", "colours")
def _colour_choice(rng):
    colour = rng.choice(list(COLOURS))
    img, draw = _canvas()
    draw.rectangle(_box(rng, rng.randint(20, 36)), fill=COLOURS[colour])
    options = sorted(rng.sample([c for c in COLOURS if c != colour], 2) + [colour])
    return (img, f"Which colour is the box: {', '.join(options)}?", colour,
            {"choices": options, "answer_index": options.index(colour)})


@_target("shape_name", "shapes")
def _shape_name(rng):
    kind = rng.choice(SHAPES)
    img, draw = _canvas()
    _shape(draw, kind, _box(rng, rng.randint(22, 40)), COLOURS[rng.choice(list(COLOURS))])
    return img, "Name the shape.", kind, {}


@_target("shape_choice", "shapes")
def _shape_choice(rng):
    kind = rng.choice(SHAPES)
    img, draw = _canvas()
    _shape(draw, kind, _box(rng, rng.randint(22, 40)), BLACK)
    options = list(SHAPES)
    return img, "Which shape is drawn: circle, square or triangle?", kind, {"choices": options,
                                                                            "answer_index": options.index(kind)}


@_target("count_dots", "counts")
def _count_dots(rng):
    img, n = _draw_dots(rng)
    return img, "How many dots are there?", str(n), {}


@_target("count_dots_words", "counts")
def _count_dots_words(rng):
    img, n = _draw_dots(rng)
    return img, "How many dots are there?", NUMBER_WORDS[n], {}


@_target("side", "positions")
def _side(rng):
    img, left = _draw_side(rng)
    return img, "Is the ball on the left or the right?", "left" if left else "right", {}


@_target("side_compass", "positions")
def _side_compass(rng):
    img, left = _draw_side(rng)
    return img, "Is the ball on the left or the right?", "west" if left else "east", {}


@_target("top_bottom", "positions")
def _top_bottom(rng):
    top = rng.random() < 0.5
    img, draw = _canvas()
    y = rng.randint(4, SIZE // 2 - 16) if top else rng.randint(SIZE // 2 + 4, SIZE - 16)
    x = rng.randint(4, SIZE - 16)
    draw.rectangle((x, y, x + 12, y + 12), fill=BLACK)
    return img, "Is the block at the top or the bottom?", "top" if top else "bottom", {}


@_target("size", "sizes")
def _size(rng):
    big = rng.random() < 0.5
    img, draw = _canvas()
    _shape(draw, rng.choice(SHAPES), _box(rng, rng.randint(32, 44) if big else rng.randint(6, 12)),
           COLOURS[rng.choice(list(COLOURS))])
    return img, "Is the shape big or small?", "big" if big else "small", {}


@_target("stripes", "textures")
def _stripes(rng):
    horizontal = rng.random() < 0.5
    img, draw = _canvas()
    width, colour = rng.randint(3, 6), COLOURS[rng.choice(list(COLOURS))]
    for i in range(rng.randint(0, width), SIZE, 2 * width):
        draw.rectangle((0, i, SIZE, i + width - 1) if horizontal else (i, 0, i + width - 1, SIZE), fill=colour)
    return img, "Are the stripes horizontal or vertical?", "horizontal" if horizontal else "vertical", {}


@_target("read_letter", "reading")
def _read_letter(rng):
    letter = rng.choice(LETTERS)
    img, draw = _canvas()
    draw.text((SIZE // 2 + rng.randint(-4, 4), SIZE // 2 + rng.randint(-4, 4)), letter, fill=BLACK,
              font=_font(rng.randint(30, 40)), anchor="mm")
    return img, "Which letter is written?", letter, {}


@_target("brightness", "brightness")
def _brightness(rng):
    light = rng.random() < 0.5
    level = rng.randint(180, 250) if light else rng.randint(10, 80)
    img, draw = _canvas((level, level, level))
    grey = 255 - level
    _shape(draw, rng.choice(SHAPES), _box(rng, rng.randint(8, 14)), (grey, grey, grey))
    return img, "Is the picture light or dark?", "light" if light else "dark", {}


@_target("same_colour", "comparisons")
def _same_colour(rng):
    same = rng.random() < 0.5
    first = rng.choice(list(COLOURS))
    second = first if same else rng.choice([c for c in COLOURS if c != first])
    img, draw = _canvas()
    draw.rectangle(_box(rng, 14, x_range=(2, SIZE // 2 - 2)), fill=COLOURS[first])
    draw.rectangle(_box(rng, 14, x_range=(SIZE // 2 + 2, SIZE - 2)), fill=COLOURS[second])
    return img, "Do the two boxes have the same colour?", "yes" if same else "no", {}


CONFLICT_PAIRS: list[tuple[str, str]] = [
    ("shape_colour", "shape_colour_caps"),
    ("count_dots", "count_dots_words"),
    ("side", "side_compass"),
]


# ----------------------------------------------------------------------------------------------- warm-up


@_warmup("fill_colour")
def _fill_colour(rng):
    colour = rng.choice(list(COLOURS))
    img, _ = _canvas(COLOURS[colour])
    return img, "Name the fill colour.", colour, {}


@_warmup("count_bars")
def _count_bars(rng):
    n = rng.randint(1, 5)
    img, draw = _canvas()
    for i in range(n):
        draw.rectangle((4 + i * 10, 8, 10 + i * 10, SIZE - 8), fill=BLACK)
    return img, "Count the bars.", str(n), {}


@_warmup("corner")
def _corner(rng):
    corner = rng.choice(["upper left", "upper right", "lower left", "lower right"])
    img, draw = _canvas()
    x = 4 if "left" in corner else SIZE - 20
    y = 4 if "upper" in corner else SIZE - 20
    draw.rectangle((x, y, x + 16, y + 16), fill=COLOURS[rng.choice(list(COLOURS))])
    return img, "Which corner holds the square?", corner, {}


@_warmup("echo")
def _echo(rng):
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))
    img, draw = _canvas()
    return img, f"Say: {word}", word, {}


# ----------------------------------------------------------------------------------------------- writing


def _example(task: VisionTask, i: int, image: str, prompt: str, answer: str, extra: dict) -> dict:
    return {
        "id": f"{task.name}-{i}",
        "source": task.name,
        "messages": [{"role": "user", "content": _image_part(prompt)}, {"role": "assistant", "content": answer}],
        "images": [image],
        "targets": [answer],
        **extra,
    }


def write_task(task: VisionTask, root: Path, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw ``n_eval`` then ``n_train`` examples of one task, saving each picture as a PNG under
    ``root/images/<task>/`` and referring to it by its path relative to ``root`` (the mixture folder)."""
    rng = random.Random(f"{seed}:vision:{task.name}")
    folder = Path(root) / "images" / task.name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_eval + n_train):
        img, prompt, answer, extra = task.generate(rng)
        rel = f"images/{task.name}/{i:05d}.png"
        img.save(Path(root) / rel, optimize=False)
        rows.append(_example(task, i, rel, prompt, answer, extra))
    return rows[n_eval:], rows[:n_eval]


def write_vision_mixture(root: Path, names: list[str] | None = None, n_train: int = 200, n_eval: int = 50,
                         seed: int = 0, warmup: bool = False) -> dict[str, tuple[list[dict], list[dict]]]:
    """{task: (train rows, eval rows)} with the pictures written under ``root/images``; the caller writes
    the rows as ``root/train/<task>.jsonl`` and ``root/eval/<task>.jsonl``."""
    table = WARMUP_TASKS if warmup else TASKS
    names = list(table) if names is None else names
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown vision task(s) {unknown}; known: {sorted(table)}")
    return {n: write_task(table[n], root, n_train, n_eval, seed) for n in names}
