"""``mixkv demo`` (the main job) end to end on the shipped toy VLM, small settings."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from mixkv.cli import demo
from mixkv.cli.main import main


@pytest.mark.slow
def test_demo_runs_and_draws_what_was_kept(toy_vlm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.sources, "load", lambda name, dtype="float32": toy_vlm)
    out = tmp_path / "demo.png"
    rc = main(["demo", "--tasks", "text", "--methods", "full,snapkv,snapkv+mixkv", "--threads", "1",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "What does the text say?" in printed
    for name in ("full", "snapkv", "snapkv+mixkv"):
        assert re.search(rf"\| text\s+\| {re.escape(name)}\s+\| (yes|no) ", printed), name
    # The compressed caches hold a fifth of the full one at budget 64 (~298-token prompts).
    assert "21.5%" in printed
    with Image.open(out) as im:
        assert im.size[0] >= 800 and im.size[1] >= 300


def test_demo_rejects_unknown_method_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(demo.sources, "load", lambda *a, **k: pytest.fail("loaded a model for a bad method name"))
    assert main(["demo", "--methods", "full,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
