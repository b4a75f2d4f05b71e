"""The eval with the gap analysis on the toy VLM, and grid-aware loading (v2 groundwork, 24x24 grids)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mixkv.cli.main import main
from mixkv.testbeds import sources
from mixkv.testbeds.toyvlm import generator as gen
from mixkv.testbeds.toyvlm import model as tv


def test_the_shipped_configs_say_grid_and_tasks():
    cfg = sources.toy_vlm_config(sources.TOY_VLM)
    assert cfg["grid"]["cells"] == gen.GRID and cfg["tasks"] == list(gen.DEFAULT_TASKS)
    cfg = sources.toy_vlm_config(sources.TOY_VLM_24)
    assert cfg["grid"]["cells"] == 24 and cfg["tasks"] == list(gen.TASKS)
    assert cfg["processor"]["num_image_tokens"] == 576
    with pytest.raises(ValueError, match="accepted: toy-vlm, toy-vlm-24"):
        tv.shipped_weights("toy-vlm-32")
    with pytest.raises(FileNotFoundError, match="train the toy VLM"):
        tv.read_config(tv.WEIGHTS_DIR.parent / "no-such-weights")


def test_processor_reads_its_grid_from_the_token_count():
    class Tok:
        eos_token_id = pad_token_id = 0

    proc = tv.ToyVLMProcessor(Tok(), 16, num_image_tokens=576, image_size=384, tasks=gen.TASKS)
    assert proc.grid == 24 and proc.tasks == gen.TASKS
    assert proc.pixel_values(gen.make_sample(0, "ground", grid=24).image).shape == (1, 3, 384, 384)
    with pytest.raises(ValueError, match="square grid"):
        tv.ToyVLMProcessor(Tok(), 16, num_image_tokens=500, image_size=384)


@pytest.mark.slow
def test_eval_with_gap_analysis_end_to_end(tmp_path, capsys):
    """``mixkv eval --model toy-vlm`` on two tasks, one sample each: tables, JSON with the gap records,
    the per-task and gap figures, and a replot from the JSON."""
    out, tasks_png, gap_png = tmp_path / "e.json", tmp_path / "t.png", tmp_path / "g.png"
    rc = main(["eval", "--model", "toy-vlm", "--tasks", "text,colour", "--n", "1", "--methods",
               "full,snapkv,snapkv+mixkv", "--budgets", "64", "--threads", "2", "--json", str(out),
               "--task-plot", str(tasks_png), "--gap-plot", str(gap_png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {(r["method"], r["budget"]) for r in data["gap"]["summary"]} == {("full", None), ("snapkv", 64),
                                                                             ("snapkv+mixkv", 64)}
    full = next(r for r in data["gap"]["summary"] if r["method"] == "full")
    assert full["answer_kept"] == 1.0 and full["accuracy"] == 1.0  # the full cache keeps every answer token
    assert len(data["gap"]["heads"]["snapkv@64"]) == 30  # layers x KV heads
    assert all("answer_kept" in s and "answer_kept_heads" not in s for s in data["samples"])
    assert "gap analysis" in capsys.readouterr().out
    for png in (tasks_png, gap_png):
        with Image.open(png) as im:
            assert im.size[0] > 400
    again = tmp_path / "again.png"
    assert main(["eval", "--from-json", str(out), "--gap-plot", str(again)]) == 0 and again.stat().st_size > 1000


def test_eval_refuses_untrained_tasks_and_gap_plots_without_answer_positions(capsys):
    assert main(["eval", "--model", "toy-vlm", "--tasks", "ground"]) == 2
    assert "not trained on ['ground']" in capsys.readouterr().err
    assert main(["eval", "--model", "smollm2-135m", "--gap-plot", "x.png"]) == 2
    assert "--gap-plot needs the toy VLM" in capsys.readouterr().err
    assert main(["eval", "--model", "toy-vlm", "--budgets", "48,128", "--gap-plot", "x.png"]) == 2
    assert "--gap-budget 64 is not among --budgets [48, 128]" in capsys.readouterr().err


@pytest.mark.slow
def test_v2_eval_stacked_end_to_end(tmp_path):
    """``mixkv eval --model toy-vlm-24`` on grounding and counting (n=1), compressed runs decoded as one
    stacked batch, with the gap records: grounding answers live in three cells (shape + two tags)."""
    out = tmp_path / "v2.json"
    rc = main(["eval", "--model", "toy-vlm-24", "--tasks", "ground,count", "--n", "1", "--methods",
               "full,snapkv,snapkv+mixkv,adakv+mixkv", "--budgets", "32,128", "--window", "16", "--stack", "6",
               "--threads", "2", "--json", str(out), "--gap-plot", str(tmp_path / "g.png"), "--gap-budget", "32"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["stack"] == 6 and data["config"]["prompt_tokens"]["min"] > 576
    runs = {(s["task"], s["method"], s["budget"]) for s in data["samples"]}
    assert len(runs) == 2 * (1 + 3 * 2)
    full = {s["task"]: s for s in data["samples"] if s["method"] == "full"}
    assert full["ground"]["score"] == full["ground"]["score_near"] == 1.0
    assert full["count"]["output"].startswith("There are ") and full["count"]["score"] == 1.0
    assert {r["method"] for r in data["gap"]["summary"]} == {"full", "snapkv", "snapkv+mixkv", "adakv+mixkv"}
