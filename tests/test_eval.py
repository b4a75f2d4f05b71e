"""``mixkv eval`` end to end on a tiny random model saved to disk (no downloads)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_inputs, make_model  # noqa: E402

from mixkv.cli.main import main  # noqa: E402
from mixkv.lab.evaluation import EvalConfig, EvalItem, evaluate, mean_over_tasks  # noqa: E402
from mixkv.testbeds import tasks as task_suite  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + a word-level tokenizer covering the task suite's words, saved like a checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = set()
    for s in task_suite.make_suite(list(task_suite.TASKS), 3, 0, 300):
        words.update(task_suite.build_prompt(None, s).replace("\n", " \n ").split())
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.5, eos_token_id=2, pad_token_id=1)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_eval_command_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    plot = tmp_path / "eval.png"
    rc = main(["eval", "--model", str(tiny_dir), "--methods", "full,snapkv,snapkv+mixkv,adakv+mixkv",
               "--budgets", "40,64", "--window", "8", "--n", "2", "--length", "150", "--max-new-tokens", "3",
               "--threads", "1", "--json", str(out), "--plot", str(plot)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["model"] == str(tiny_dir)
    rows = data["results"]
    keys = {"task", "method", "budget", "accuracy", "n"}
    assert all(set(r) == keys for r in rows)
    tasks = set(task_suite.TASKS)
    for task in tasks | {"mean"}:
        got = {(r["method"], r["budget"]) for r in rows if r["task"] == task}
        assert got == {("full", None), ("snapkv", 40), ("snapkv", 64), ("snapkv+mixkv", 40), ("snapkv+mixkv", 64),
                       ("adakv+mixkv", 40), ("adakv+mixkv", 64)}
    assert all(r["n"] == 2 for r in rows if r["task"] != "mean")
    assert data["config"]["seed"] == 0 and data["config"]["runtime_s"] > 0
    assert data["config"]["redundancy"] == "online" and data["config"]["profile"] is None
    printed = capsys.readouterr().out
    assert "snapkv+mixkv" in printed and "B=40" in printed
    with Image.open(plot) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_eval_command_rejects_bad_input(tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--methods", "snapkv,bogus"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--budgets", "16", "--window", "32"]) == 2
    assert "larger than the window" in capsys.readouterr().err


def test_full_cache_equals_budget_covering_prompt():
    """On one shared prefill, a budget covering the prompt scores exactly like the full cache."""
    model = make_model("llama")
    items = []
    for seed in range(3):
        inputs = make_inputs(model, "llama", seed=seed)
        items.append(EvalItem(task="t", inputs=inputs, score=lambda text: float(len(text) % 2)))
    config = EvalConfig(methods=["full", "snapkv+mixkv", "adakv"], budgets=[500], window=8, max_new_tokens=4)
    out = evaluate(model, items, config, decode_text=lambda ids: " ".join(map(str, ids)), progress=False)
    by = {(s["index"], s["method"]): s["output"] for s in out["samples"]}
    for i in range(3):
        assert by[(i, "full")] == by[(i, "snapkv+mixkv")] == by[(i, "adakv")]
    means = mean_over_tasks(out["results"])
    assert {m["method"] for m in means} == {"full", "snapkv+mixkv", "adakv"}


def test_eval_replots_from_json(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--methods", "full,snapkv", "--budgets", "40", "--window", "8",
                 "--n", "1", "--length", "120", "--max-new-tokens", "2", "--threads", "1", "--json", str(out)]) == 0
    plot = tmp_path / "again.png"
    assert main(["eval", "--from-json", str(out), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 1000


def test_items_can_cap_tokens_add_scores_and_record_kept_answers():
    """A short expected reply caps decoding; extra scores land in samples and results; ``observe`` sees
    each run's plans (the gap analysis reads which answer tokens were kept)."""
    from mixkv.lab.gap import answer_kept, kept_record

    model = make_model("llama")
    inputs = make_inputs(model, "llama", seed=0)
    n = inputs["input_ids"].shape[1]
    item = EvalItem(task="t", inputs=inputs, score=lambda text: 1.0, max_new_tokens=2,
                    extra_scores={"near": lambda text: 0.5}, meta={"answer_positions": [1, n - 1]})
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    config = EvalConfig(methods=["full", "snapkv"], budgets=[12], window=4, max_new_tokens=6)
    out = evaluate(model, [item], config, decode_text=lambda ids: " ".join(map(str, ids)), progress=False,
                   observe=lambda it, run: kept_record(answer_kept(run.plans, layers, heads,
                                                                   it.meta["answer_positions"])))
    by = {s["method"]: s for s in out["samples"]}
    assert all(len(s["output"].split()) == 2 and s["score_near"] == 0.5 for s in by.values())
    assert all(r["accuracy_near"] == 0.5 for r in out["results"])
    assert by["full"]["answer_kept"] == 1.0
    # the last prompt token is in every window; position 1 survives only where a head scored it high
    assert 0.5 <= by["snapkv"]["answer_kept"] <= 1.0 and len(by["snapkv"]["answer_kept_heads"]) == layers * heads


def test_tables_show_a_full_cache_only_run():
    from mixkv.lab.report import accuracy_tables

    text = accuracy_tables([{"task": "a", "method": "full", "budget": None, "accuracy": 0.75, "n": 4},
                            {"task": "mean", "method": "full", "budget": None, "accuracy": 0.75, "n": 4}])
    assert "| method | accuracy |" in text and "| full   |      75% |" in text and "mean (n=4)" in text
