"""Seeded synthetic "document" images for the toy VLM: a 16x16 grid of cells, almost all background.

Why this design: KV-cache compression must be able to hurt the model, so an answer has to live in a
few visual tokens among many redundant ones -- like the text of a scanned page or the marks of a chart
on a blank canvas. Each image is ``GRID x GRID`` cells of ``CELL`` pixels; one cell is exactly one
vision patch and hence one visual token (row-major: token ``row * GRID + col`` of the image). The
background is uniform or a texture that repeats every cell (so all background cells are pixel-identical
within an image); a few cells hold a coloured shape, and four consecutive cells of one row hold a short
code written in a built-in 5x7 pixel font (``K7P2``: letter, digit, letter, digit).

Every sample is generated from its own ``random.Random(seed)`` (never global state), so a seed gives
the same image, question and answer on every machine; the drawing uses only PIL primitives and the
font table below (no system fonts).

Tasks (``TASKS``)
-----------------
``colour``  "What colour is the star?"        -> "The star is red."          (answer ``red``)
``shape``   "Which shape is red?"             -> "The red shape is a star."  (answer ``star``)
``text``    "What does the text say?"         -> "The text says K7P2."       (answer ``K7P2``)
``count``   "How many shapes are there?"      -> "There are 4 shapes."       (answer ``4``; not trained
            by default, see the model card)
``ground``  "Where is the red star?"          -> "The red star is in row E, column l."  (answer ``5,12``:
            row 5, column 12, 1-based; scored exactly by :func:`score` and within one cell by
            :func:`score_near`, as ScreenSpot counts a click inside the target box)

Grounding names rows by upper-case letters (``A`` = row 1) and columns by lower-case letters (``a`` =
column 1), so grids up to 26 cells per side. Why letters: SmolLM2 splits numbers into digit tokens
(" 12" -> " ", "1", "2"), so a reply with numbers needs an ordered pair of digits that no single visual
token can hold, while " E" and " l" are single tokens the visual token of the shape can carry (see the
training recipe in ``scripts/train_toyvlm.py``). Upper vs lower case keeps row and column apart.

The grid size is a property of each scene (``make_scene(seed, grid=24)``: 576 visual tokens, the regime
of the paper's document and GUI benchmarks); the shipped toy VLM uses ``GRID`` = 16. Boards other than
16 are *tagged*: right of each shape stand two small grey pointers, a row tag and a column tag, whose
visual tokens say the shape's row (``" E"``) and column (``" l"``), as GUI screenshots put a label next to
an icon. A grounding answer therefore lives in three cells (the shape and its two tags). Tagged boards
also number their shapes 1..k in reading order, with a digit left of each shape (a numbered list in a
GUI): the answer to a count is the last number, one cell (``answer_cells`` lists it first, then the shapes).

Replies start with fixed words ("The ...") on purpose: the first generated token comes from the
prefill, which always sees the full prompt, so the informative token must come after it for a
compressed cache to matter.

Each sample knows where its answer is: ``answer_cells`` ((row, col) pairs) and ``answer_patches``
(indices among the image's ``GRID * GRID`` visual tokens); add the position of the first image token
in ``input_ids`` to get prompt positions (``ToyVLMProcessor.answer_positions`` does this).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "CELL",
    "COLOURS",
    "GLYPHS",
    "GRID",
    "IMAGE_SIZE",
    "NUM_PATCHES",
    "SHAPES",
    "TASKS",
    "Element",
    "Sample",
    "Scene",
    "ROW_LABELS",
    "COL_LABELS",
    "cell_name",
    "cell_words",
    "extract_answer",
    "make_sample",
    "make_samples",
    "make_scene",
    "questions_for",
    "render",
    "score",
    "score_near",
]

GRID = 16  # cells per side -> GRID * GRID = 256 visual tokens
CELL = 16  # pixels per cell = vision patch size
IMAGE_SIZE = GRID * CELL
NUM_PATCHES = GRID * GRID
ELEMENT_ROWS = GRID - 1  # no element in the last row (it falls in the compression window of short prompts)

# Names are single SmolLM2 tokens with a leading space (" red", " star", ...).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
    "pink": (245, 120, 190),
    "brown": (130, 80, 30),
}
SHAPES = ("star", "circle", "square", "triangle", "heart", "cross", "diamond")
TASKS = ("colour", "shape", "text", "count", "ground")
DEFAULT_TASKS = ("colour", "shape", "text")
ROW_LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # grounding: row r (0-based) is ROW_LABELS[r]
COL_LABELS = ROW_LABELS.lower()

# 5x7 pixel font, drawn at 2x (10x14 pixels) in a 16-pixel cell. Letters that look like digits
# (O, I, S, Z, B, G, Q, D, J, W) are left out so every glyph is unambiguous.
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "F": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "N": ("10001", "10001", "11001", "10101", "10011", "10001", "10001"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "V": ("10001", "10001", "10001", "10001", "10001", "01010", "00100"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "Y": ("10001", "10001", "01010", "00100", "00100", "00100", "00100"),
}
DIGITS = tuple(c for c in _FONT if c.isdigit())
LETTERS = tuple(c for c in _FONT if c.isalpha())
GLYPHS = DIGITS + LETTERS
CODE_LENGTH = 4

_BACKGROUNDS = ((255, 255, 255), (246, 244, 236), (236, 240, 246), (242, 242, 242))
_TEXTURES = ("plain", "dots", "grid", "lines")
_TEXTURE_INK = (200, 200, 205)
_GLYPH_INK = (20, 20, 20)
_TAG_INK = (90, 90, 90)


@dataclass(frozen=True)
class Element:
    """One informative cell: a coloured shape (``kind="shape"``), one glyph of the code (``"glyph"``), one
    of the two coordinate tags right of a shape on tagged boards (``"tag"``, named ``"row E"`` / ``"column l"``)
    or the list number left of a shape on numbered boards (``"number"``, named ``"3"``, drawn as a glyph)."""

    kind: str
    row: int
    col: int
    name: str  # shape name or glyph character
    colour: str | None = None

    @property
    def patch(self) -> int:
        """Index among a ``GRID`` x ``GRID`` image's visual tokens (see :meth:`patch_in` for other grids)."""
        return self.patch_in(GRID)

    def patch_in(self, grid: int) -> int:
        return self.row * grid + self.col

    @property
    def words(self) -> str:
        """What the cell shows, in words: ``"red star"``, ``"K"`` or a tag's label (``"row E"``, ``"column l"``)."""
        return f"{self.colour} {self.name}" if self.kind == "shape" else self.name


@dataclass(frozen=True)
class Scene:
    """One image's content: background style and the informative elements."""

    seed: int
    background: tuple[int, int, int]
    texture: str
    elements: tuple[Element, ...]
    grid: int = GRID

    @property
    def image_size(self) -> int:
        return self.grid * CELL

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def shapes(self) -> tuple[Element, ...]:
        return tuple(e for e in self.elements if e.kind == "shape")

    @property
    def glyphs(self) -> tuple[Element, ...]:
        return tuple(e for e in self.elements if e.kind == "glyph")

    @property
    def tags(self) -> tuple[Element, ...]:
        return tuple(e for e in self.elements if e.kind == "tag")

    @property
    def numbers(self) -> tuple[Element, ...]:
        return tuple(e for e in self.elements if e.kind == "number")

    @property
    def code(self) -> str:
        return "".join(e.name for e in self.glyphs)


@dataclass(frozen=True)
class Sample:
    """One image and one question.

    ``answer`` is the item scored (``"red"``, ``"star"``, ``"K7P2"``, ``"4"``); ``reply`` the full sentence
    the model was trained to give; ``answer_cells`` / ``answer_patches`` where the answer is drawn
    (``patch = row * GRID + col``, the index among the image's visual tokens).
    """

    seed: int
    task: str
    question: str
    answer: str
    reply: str
    answer_cells: tuple[tuple[int, int], ...]
    scene: Scene = field(hash=False)
    choices: tuple[str, ...] = field(default=(), hash=False)

    @property
    def answer_patches(self) -> tuple[int, ...]:
        return tuple(r * self.scene.grid + c for r, c in self.answer_cells)

    @property
    def image(self) -> Image.Image:
        return render(self.scene)

    @property
    def meta(self) -> dict[str, Any]:
        return {"seed": self.seed, "task": self.task, "answer_patches": list(self.answer_patches),
                "choices": list(self.choices)}


# ---------------------------------------------------------------------------------------------------------
# scenes


def make_scene(seed: int, n_shapes: tuple[int, int] = (3, 5), grid: int = GRID, tags: bool | None = None,
               numbers: bool | None = None) -> Scene:
    """A random scene on a ``grid`` x ``grid`` board: ``n_shapes`` (inclusive range) shapes of distinct
    kinds and colours plus one code. ``grid=GRID`` gives exactly the scenes the shipped model knows.

    ``tags`` (default: on for every grid but ``GRID``, i.e. the v2 board) draws two coordinate tags right of
    each shape, like the labels next to an icon in a GUI: a row tag (one pointer) and a column tag (two
    pointers), whose visual tokens carry the words ``" E"`` and ``" l"`` of the shape's cell. Why: a
    visual token that sums content and position (``" red" + " star" + " E" + " l"``) did not train on
    these CPUs (docs/toyvlm.md), while "find the token after the red star and copy it" is the
    induction pattern a pretrained LM already has.

    ``numbers`` (default: as ``tags``) writes a list number left of each shape, 1..k in reading order (the
    glyph digits of the code's font), as a GUI numbers the items of a list. Why: a count over 576 visual
    tokens did not train on these CPUs (the model answered "4" to almost every image); with numbers,
    counting is reading the number of the last shape, which only a cache that kept it can do.
    """
    if not isinstance(grid, int) or grid < CODE_LENGTH + 2:
        raise ValueError(f"grid must be an int >= {CODE_LENGTH + 2} cells per side, got {grid!r}")
    tagged = grid != GRID if tags is None else tags
    numbered = tagged if numbers is None else numbers  # at most len(SHAPES) = 7 shapes: digits 1..7
    if tagged and grid > len(ROW_LABELS):
        raise ValueError(f"coordinate tags name cells by letters: grids up to {len(ROW_LABELS)}, got {grid}")
    lo, hi = n_shapes
    if not 1 <= lo <= hi <= len(SHAPES):
        raise ValueError(f"n_shapes must be a range within 1..{len(SHAPES)} (distinct kinds), got {n_shapes!r}")
    element_rows = grid - 1  # no element in the last row (it falls in the window of short prompts)
    rng = random.Random(seed)
    background = rng.choice(_BACKGROUNDS)
    texture = rng.choice(_TEXTURES)
    occupied: set[tuple[int, int]] = set()

    def free(r: int, c: int) -> bool:  # the cell and its 8 neighbours are empty
        return all((r + dr, c + dc) not in occupied for dr in (-1, 0, 1) for dc in (-1, 0, 1))

    row = rng.randrange(element_rows)
    col = rng.randrange(grid - CODE_LENGTH + 1)
    chars = [rng.choice(LETTERS) if i % 2 == 0 else rng.choice(DIGITS) for i in range(CODE_LENGTH)]
    elements = [Element("glyph", row, col + i, ch) for i, ch in enumerate(chars)]
    occupied.update((row, col + i) for i in range(CODE_LENGTH))

    k = rng.randint(*n_shapes)
    kinds = rng.sample(SHAPES, k)
    colours = rng.sample(sorted(COLOURS), k)
    lead = 1 if numbered else 0  # the list number stands left of its shape
    width = lead + (3 if tagged else 1)  # [number,] shape[, row tag, column tag], side by side
    placed = []
    for kind, colour in zip(kinds, colours):
        while True:
            r, c = rng.randrange(element_rows), rng.randrange(grid - width + 1)
            if all(free(r, c + i) for i in range(width)):
                break
        occupied.update((r, c + i) for i in range(width))
        c += lead
        placed.append((r, c))
        elements.append(Element("shape", r, c, kind, colour))
        if tagged:
            elements.append(Element("tag", r, c + 1, f"row {ROW_LABELS[r]}"))
            elements.append(Element("tag", r, c + 2, f"column {COL_LABELS[c]}"))
    if numbered:  # numbered 1..k in reading order, so the last number is the count
        for i, (r, c) in enumerate(sorted(placed)):
            elements.append(Element("number", r, c - 1, str(i + 1)))
    elements.sort(key=lambda e: e.patch_in(grid))
    return Scene(seed=seed, background=background, texture=texture, elements=tuple(elements), grid=grid)


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    import math

    pts = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, x: int, y: int, kind: str, fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse([x + 2, y + 2, x + 13, y + 13], fill=fill)
    elif kind == "square":
        draw.rectangle([x + 3, y + 3, x + 12, y + 12], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x + 7.5, y + 1), (x + 14, y + 13), (x + 1, y + 13)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(x + 7.5, y + 0.5), (x + 14.5, y + 7.5), (x + 7.5, y + 14.5), (x + 0.5, y + 7.5)], fill=fill)
    elif kind == "star":
        draw.polygon(_star(x + 7.5, y + 8, 7.5, 3.2), fill=fill)
    elif kind == "cross":
        draw.rectangle([x + 6, y + 1, x + 9, y + 14], fill=fill)
        draw.rectangle([x + 1, y + 6, x + 14, y + 9], fill=fill)
    elif kind == "heart":
        draw.ellipse([x + 1, y + 2, x + 8, y + 9], fill=fill)
        draw.ellipse([x + 7, y + 2, x + 14, y + 9], fill=fill)
        draw.polygon([(x + 1.5, y + 7), (x + 13.5, y + 7), (x + 7.5, y + 14)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _draw_glyph(draw: ImageDraw.ImageDraw, x: int, y: int, ch: str) -> None:
    for j, bits in enumerate(_FONT[ch]):
        for i, bit in enumerate(bits):
            if bit == "1":
                px, py = x + 3 + 2 * i, y + 1 + 2 * j
                draw.rectangle([px, py, px + 1, py + 1], fill=_GLYPH_INK)


def _draw_tag(draw: ImageDraw.ImageDraw, x: int, y: int, pointers: int) -> None:
    """One (row tag) or two (column tag) grey pointers aiming left, at the shape."""
    step = 6 if pointers == 2 else 0
    for i in range(pointers):
        left = x + 2 + i * step
        draw.polygon([(left, y + 7.5), (left + 6, y + 3), (left + 6, y + 12)], fill=_TAG_INK)


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as a ``scene.image_size`` square RGB image (deterministic, no fonts)."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for r in range(scene.grid):  # a texture that repeats every cell: all background cells are identical
        for c in range(scene.grid):
            x, y = c * CELL, r * CELL
            if scene.texture == "dots":
                draw.rectangle([x + 7, y + 7, x + 8, y + 8], fill=_TEXTURE_INK)
            elif scene.texture == "grid":
                draw.line([x, y, x + CELL - 1, y], fill=_TEXTURE_INK)
                draw.line([x, y, x, y + CELL - 1], fill=_TEXTURE_INK)
            elif scene.texture == "lines":
                draw.line([x, y + 12, x + CELL - 1, y + 12], fill=_TEXTURE_INK)
    for e in scene.elements:
        x, y = e.col * CELL, e.row * CELL
        draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=scene.background)  # elements hide the texture
        if e.kind == "shape":
            _draw_shape(draw, x, y, e.name, COLOURS[e.colour])
        elif e.kind == "tag":
            _draw_tag(draw, x, y, pointers=1 if e.name.startswith("row") else 2)
        else:
            _draw_glyph(draw, x, y, e.name)
    return img


def cell_words(scene: Scene) -> list[str]:
    """Per visual token (row-major), what its cell shows in words: ``"blank"``, ``"red star"`` or ``"K"``."""
    words = ["blank"] * scene.num_patches
    for e in scene.elements:
        words[e.patch_in(scene.grid)] = e.words
    return words


# ---------------------------------------------------------------------------------------------------------
# questions


def questions_for(scene: Scene, task: str, rng: random.Random) -> Sample:
    """One question of kind ``task`` about ``scene`` (the target element drawn from ``rng``)."""
    if task == "colour":
        e = rng.choice(scene.shapes)
        return Sample(scene.seed, task, f"What colour is the {e.name}?", e.colour, f"The {e.name} is {e.colour}.",
                      ((e.row, e.col),), scene, tuple(COLOURS))
    if task == "shape":
        e = rng.choice(scene.shapes)
        return Sample(scene.seed, task, f"Which shape is {e.colour}?", e.name,
                      f"The {e.colour} shape is a {e.name}.", ((e.row, e.col),), scene, SHAPES)
    if task == "text":
        cells = tuple((g.row, g.col) for g in scene.glyphs)
        return Sample(scene.seed, task, "What does the text say?", scene.code, f"The text says {scene.code}.",
                      cells, scene)
    if task == "count":
        n = len(scene.shapes)
        # numbered boards: the last number first (what a reader of the list needs), then every shape
        last = tuple((e.row, e.col) for e in scene.numbers if e.name == str(n))
        cells = last + tuple((e.row, e.col) for e in scene.shapes)
        return Sample(scene.seed, task, "How many shapes are there?", str(n), f"There are {n} shapes.", cells,
                      scene)
    if task == "ground":
        if scene.grid > len(ROW_LABELS):
            raise ValueError(f"grounding names cells by letters: grids up to {len(ROW_LABELS)}, got {scene.grid}")
        e = rng.choice(scene.shapes)
        tags = tuple((t.row, t.col) for t in scene.tags if t.row == e.row and t.col in (e.col + 1, e.col + 2))
        return Sample(scene.seed, task, f"Where is the {e.colour} {e.name}?", f"{e.row + 1},{e.col + 1}",
                      f"The {e.colour} {e.name} is in {cell_name(e.row, e.col)}.", ((e.row, e.col), *tags), scene)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def cell_name(row: int, col: int) -> str:
    """How grounding replies name a cell (0-based in, letters out): ``cell_name(4, 11) == "row E, column l"``."""
    return f"row {ROW_LABELS[row]}, column {COL_LABELS[col]}"


def make_sample(seed: int, task: str | None = None, tasks: tuple[str, ...] = DEFAULT_TASKS,
                grid: int = GRID) -> Sample:
    """The sample of ``seed``: its scene, and a question of ``task`` (drawn from ``tasks`` when None)."""
    scene = make_scene(seed, grid=grid)
    rng = random.Random(seed * 7919 + 17)  # question choice independent of the scene's draws
    chosen = task if task is not None else rng.choice(tasks)
    return questions_for(scene, chosen, rng)


def make_samples(n: int, seed: int = 0, tasks: tuple[str, ...] = DEFAULT_TASKS, grid: int = GRID) -> list[Sample]:
    """``n`` samples cycling through ``tasks`` (so each task gets ``n / len(tasks)``), seeds ``seed``..``seed+n-1``."""
    return [make_sample(seed + i, tasks[i % len(tasks)], grid=grid) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# scoring

_CODE = re.compile(rf"\b[A-Z0-9]{{{CODE_LENGTH}}}\b")
_NUMBER = re.compile(r"\d+")
_CELL = re.compile(r"\brow ([A-Z])\b,? column ([a-z])\b")
_WORD = re.compile(r"[a-z]+")


def extract_answer(sample: Sample, text: str) -> str | None:
    """The first item of the reply that could answer ``sample``'s question (None when there is none).

    Colour / shape: the first word that is a colour / shape name; text: the first run of exactly
    ``CODE_LENGTH`` upper-case letters and digits; count: the first number.
    """
    if sample.task in ("colour", "shape"):
        for word in _WORD.findall(text.lower()):
            if word in sample.choices:
                return word
        return None
    if sample.task == "ground":  # the first "row X, column y": 1-based "row,col"
        m = _CELL.search(text)
        return f"{ROW_LABELS.index(m.group(1)) + 1},{COL_LABELS.index(m.group(2)) + 1}" if m else None
    pattern = _CODE if sample.task == "text" else _NUMBER
    m = pattern.search(text)
    return m.group(0) if m else None


def score(sample: Sample, text: str) -> float:
    """1.0 when the first candidate answer in ``text`` equals ``sample.answer``, else 0.0."""
    return float(extract_answer(sample, text) == sample.answer)


def score_near(sample: Sample, text: str, cells: int = 1) -> float:
    """Grounding: 1.0 when the reply's (row, column) is within ``cells`` of the answer in both directions
    (a click inside a small box around the target); other tasks: :func:`score`."""
    if sample.task != "ground":
        return score(sample, text)
    got = extract_answer(sample, text)
    if got is None:
        return 0.0
    (r, c), (ar, ac) = (tuple(map(int, x.split(","))) for x in (got, sample.answer))
    return float(abs(r - ar) <= cells and abs(c - ac) <= cells)
