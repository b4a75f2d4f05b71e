"""``mixkv compare``: prompt export, budget matching, aggregation, ratios and tables on fake data.

No kvpress venv and no real model: the kvpress runner script is imported only for its pure helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from mixkv import compare
from mixkv.testbeds import tasks

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kvpress" / "run_kvpress.py"


def _script():
    spec = importlib.util.spec_from_file_location("run_kvpress", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WordTokenizer:
    """Whitespace tokenizer with a fixed vocabulary by hash; no chat template."""

    chat_template = None
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + (sum(map(ord, w)) % 997) for w in text.split()]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}


# ---- budgets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [33, 64, 100, 128, 256, 1000])
def test_matched_ratio_keeps_exactly_the_budget(budget):
    script = _script()
    for n in list(range(budget + 1, budget + 400)) + [1023, 1024, 1049, 2048, 4096, 8191, 8192, 32768, 131072]:
        r = compare.matched_ratio(n, budget)
        assert r == script.matched_ratio(n, budget)
        assert 0 < r < 1
        assert compare.kvpress_n_kept(n, r) == budget, (n, budget, r)
    assert compare.matched_ratio(budget, budget) == 0.0
    assert compare.matched_ratio(budget - 1, budget) == 0.0


def test_mixkv_budget_from_budget_or_ratio():
    assert compare.mixkv_budget(1000, {"budget": 128}) == 128
    assert compare.mixkv_budget(128, {"budget": 128}) is None  # fits: no compression, as kvpress
    # kvpress keeps int(N * (1 - ratio)) per head; mixkv is given exactly that many
    assert compare.mixkv_budget(1049, {"budget": None, "compression_ratio": 0.9}) == int(1049 * 0.1) == 104
    assert compare.mixkv_budget(1000, {"budget": None, "compression_ratio": 0.0}) is None
    with pytest.raises(ValueError, match="window"):
        compare.mixkv_budget(100, {"budget": None, "compression_ratio": 0.9, "window": 32})


def test_script_scoring_rule_matches_mixkv():
    script = _script()
    sample = tasks.Sample("passkey", "", "48213", {"answer_kind": "number"})
    prompt = {"answer": "48213", "answer_kind": "number", "choices": None}
    for text in ["The pass key is 48213.", "48,213", "It is 4821 3", "no number", "1 48213", "48213 and 1"]:
        assert (script.first_item(text, prompt) == "48213") == (tasks.score(sample, text) == 1.0), text
        assert compare.score_text({"task": "passkey", **prompt}, text) == tasks.score(sample, text)
    words = {"answer": "green", "answer_kind": "word", "choices": ["red", "green"]}
    wsample = tasks.Sample("x", "", "green", {"answer_kind": "word", "choices": ["red", "green"]})
    for text in ["The colour is green.", "red, no, green", "GREEN"]:
        assert (script.first_item(text, words) == "green") == (tasks.score(wsample, text) == 1.0), text


# ---- prompt export -----------------------------------------------------------------------------------

def test_export_prompts_token_ids_answers_and_settings():
    tok = WordTokenizer()
    settings = {"methods": ["full", "snapkv"], "budget": 64, "compression_ratio": None, "window": 32}
    spec = compare.export_prompts(tok, [200, 400], ["passkey"], 2, 0, settings)
    assert spec["format"] == compare.PROMPTS_FORMAT and spec["settings"] == settings
    prompts = spec["prompts"]
    assert [p["id"] for p in prompts] == ["200/passkey/0", "200/passkey/1", "400/passkey/0", "400/passkey/1"]
    expected = tasks.make_suite(["passkey"], 2, 0, 400, tok)
    for p, sample in zip(prompts[2:], expected):
        assert p["input_ids"] == tok.encode(tasks.build_prompt(tok, sample))
        assert p["answer"] == sample.answer and p["task"] == "passkey" and p["context"] == 400
        assert all(isinstance(t, int) for t in p["input_ids"])
    assert len(prompts[2]["input_ids"]) > len(prompts[0]["input_ids"])
    json.dumps(spec)  # plain JSON


def test_export_prompts_rejects_ambiguous_size_and_short_prompts():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="exactly one"):
        compare.export_prompts(tok, [200], ["passkey"], 1, 0, {"budget": 64, "compression_ratio": 0.5})
    with pytest.raises(ValueError, match="exactly one"):
        compare.export_prompts(tok, [200], ["passkey"], 1, 0, {"budget": None, "compression_ratio": None})
    with pytest.raises(ValueError, match="window"):
        compare.export_prompts(tok, [5], ["passkey"], 1, 0, {"budget": 64, "window": 1000})


# ---- aggregation, ratios, agreement -----------------------------------------------------------------

def _run(impl, method, pid="1024/passkey/0", ctx=1024, prefill=1.0, decode=(10.0, 12.0, 14.0), kv=100, score=1.0,
         tokens=(5, 6, 2), kept=None, counts=None, compress=0.1):
    return {"prompt_id": pid, "context": ctx, "task": "passkey", "method": method, "impl": impl,
            "prompt_tokens": 1000, "kept_per_head": 128 if method != "full" else 1000, "prefill_s": prefill,
            "compress_s": compress if method != "full" else 0.0, "decode_step_ms": list(decode),
            "decode_ms_per_token": sorted(decode)[len(decode) // 2], "kv_bytes": kv, "kv_bytes_unmasked": kv,
            "rss_before_mib": 100.0, "peak_rss_mib": 110.0, "tokens": list(tokens), "decode_tokens": list(tokens),
            "kept": kept, "kept_counts": counts, "score": score}


def test_summarize_pools_decode_steps_and_averages_accuracy():
    runs = [_run("mixkv", "snapkv", pid="a", decode=(1.0, 2.0, 3.0), score=1.0, prefill=1.0),
            _run("mixkv", "snapkv", pid="b", decode=(10.0, 20.0, 30.0), score=0.0, prefill=3.0),
            _run("mixkv", "snapkv", pid="c", decode=(100.0,), score=1.0, prefill=2.0)]
    s = compare.summarize(runs)[(1024, "snapkv", "mixkv")]
    assert s["n"] == 3
    assert s["decode_ms_per_token"] == 10.0  # median of all 7 steps, not of the per-prompt medians
    assert s["prefill_s"] == 2.0
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["peak_extra_mib"] == 10.0


def test_compare_rows_ratios_are_kvpress_over_mixkv_and_missing_sides_are_none():
    runs = [_run("mixkv", "snapkv", prefill=2.0, decode=(10.0,), kv=100),
            _run("kvpress", "snapkv", prefill=3.0, decode=(5.0,), kv=100),
            _run("mixkv", "adakv", kv=100), _run("kvpress", "adakv", kv=800),
            _run("mixkv", "full", ctx=2048, pid="2048/passkey/0")]
    rows = compare.compare_rows(compare.summarize(runs))
    assert [(r["context"], r["method"]) for r in rows] == [(1024, "snapkv"), (1024, "adakv"), (2048, "full")]
    snap, ada, full = rows
    assert snap["ratio_prefill_s"] == 1.5 and snap["ratio_decode_ms_per_token"] == 0.5
    assert snap["ratio_kv_bytes"] == 1.0 and ada["ratio_kv_bytes"] == 8.0
    assert full["kvpress_prefill_s"] is None and full["ratio_prefill_s"] is None
    assert compare.ratio(1.0, 0) is None and compare.ratio(None, 1.0) is None
    text = compare.format_tables(rows)
    assert "8.00x" in text and "1.50x" in text and "0.50x" in text
    assert text.count("\n\n") == 1  # two tables
    full_line = next(line for line in text.splitlines() if "| full" in line and "2048" in line)
    assert "-" in full_line


def test_kept_overlap_and_allocation_difference():
    a = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3]]]
    assert compare.kept_overlap(a, a) == [1.0, 1.0]
    b = [[[0, 1, 2, 9], [4, 5, 6, 7]], [[0, 1, 2], [3]]]
    assert compare.kept_overlap(a, b) == [7 / 8, 3 / 4]
    assert compare.kept_overlap(a, None) is None and compare.kept_overlap(a, a[:1]) is None
    assert compare.alloc_difference([[2, 2]], [[2, 2]]) == 0.0
    assert compare.alloc_difference([[3, 1]], [[2, 2]]) == pytest.approx(0.5)
    assert compare.alloc_difference([[1]], None) is None


def test_agreement_pairs_runs_by_prompt_and_method():
    kept = [[[0, 1], [2, 3]]]
    m = [_run("mixkv", "snapkv", pid="p0", tokens=(5, 6, 2), kept=kept, counts=[[2, 2]]),
         _run("mixkv", "snapkv", pid="p1", tokens=(5, 7, 2), kept=kept, counts=[[2, 2]], score=0.0)]
    k = [_run("kvpress", "snapkv", pid="p0", tokens=(5, 6, 2), kept=kept, counts=[[2, 2]]),
         _run("kvpress", "snapkv", pid="p1", tokens=(5, 6, 2), kept=[[[0, 1], [2, 4]]], counts=[[2, 2]])]
    a = compare.agreement(m, k)[(1024, "snapkv")]
    assert a["n"] == 2 and a["same_answer"] == 0.5 and a["same_correctness"] == 0.5
    assert a["first_divergent_token"] == [None, 1]
    assert a["kept_overlap"] == pytest.approx((1.0 + 0.75) / 2)
    assert a["alloc_difference"] == 0.0
    rows = compare.compare_rows(compare.summarize(m + k), compare.agreement(m, k))
    assert rows[0]["same_answer"] == 0.5


def test_adakv_as_kvpress_row_is_paired_with_kvpress_adakv():
    kept = [[[0, 1], [2, 3]]]
    m = [_run("mixkv", "adakv", kept=[[[0, 1, 5], [2]]], counts=[[3, 1]]),
         _run("mixkv", compare.ADAKV_AS_KVPRESS, kept=kept, counts=[[2, 2]], kv=50)]
    k = [_run("kvpress", "adakv", kept=kept, counts=[[2, 2]], kv=400)]
    agree = compare.agreement(m, k)
    assert agree[(1024, compare.ADAKV_AS_KVPRESS)]["kept_overlap"] == 1.0
    assert agree[(1024, "adakv")]["kept_overlap"] == 0.75
    rows = compare.compare_rows(compare.summarize(m + k), agree)
    assert [r["method"] for r in rows] == ["adakv", compare.ADAKV_AS_KVPRESS]
    assert rows[1]["ratio_kv_bytes"] == 8.0 and rows[1]["kept_overlap"] == 1.0


def test_build_report_scores_both_sides_with_mixkv_scorer():
    spec = {"settings": {"budget": 128}, "prompts": [
        {"id": "p0", "context": 1024, "task": "passkey", "answer": "48213", "answer_kind": "number",
         "choices": None, "input_ids": [1, 2, 3]}]}
    mix = [dict(_run("mixkv", "snapkv", pid="p0", kept=[[[1]]]), text="The pass key is 48213.")]
    kvp = {"format": compare.KVPRESS_FORMAT, "versions": {"kvpress": "0.5.5"},
           "runs": [dict(_run("kvpress", "snapkv", pid="p0", kept=[[[1]]]), text="The pass key is 4.")]}
    report = compare.build_report(spec, mix, kvp, extra={"model": "fake"})
    row = report["rows"][0]
    assert row["mixkv_accuracy"] == 1.0 and row["kvpress_accuracy"] == 0.0
    assert report["kvpress"] == {"format": compare.KVPRESS_FORMAT, "versions": {"kvpress": "0.5.5"}}
    assert "kept" not in report["runs"]["mixkv"][0] and report["model"] == "fake"
    json.dumps(report)


def test_load_kvpress_results_checks_the_format(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"format": "something else", "runs": []}))
    with pytest.raises(ValueError, match="not a kvpress results file"):
        compare.load_kvpress_results(path)


def test_check_kvpress_results_rejects_other_settings_or_prompts():
    settings = {"methods": ["snapkv"], "budget": 128, "window": 32}
    spec = {"settings": settings, "prompts": [{"id": "p0", "input_ids": [1] * 1000}]}
    good = {"settings": dict(settings), "runs": [{"prompt_id": "p0", "method": "snapkv", "prompt_tokens": 1000}]}
    compare.check_kvpress_results(spec, good)
    with pytest.raises(ValueError, match="budget=64"):
        compare.check_kvpress_results(spec, dict(good, settings=dict(settings, budget=64)))
    with pytest.raises(ValueError, match="999 in the kvpress"):
        compare.check_kvpress_results(spec, dict(good, runs=[dict(good["runs"][0], prompt_tokens=999)]))
    with pytest.raises(ValueError, match="lack prompt p0 under snapkv"):
        compare.check_kvpress_results(spec, dict(good, runs=[]))


def test_plot_compare_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_run(impl, method, ctx=ctx, pid=f"{ctx}") for impl in compare.IMPLS for method in compare.METHODS
            for ctx in (1024, 2048)]
    path = compare.plot_compare(compare.compare_rows(compare.summarize(runs)), tmp_path / "c.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---- command line ------------------------------------------------------------------------------------

def test_cli_parser_defaults_and_exclusive_size():
    from mixkv.cli import compare as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--contexts", "1024", "--n", "2", "--threads", "1"])
    assert args.run is cli.run and args.methods == "full,snapkv,adakv" and args.budget is None
    assert args.ratio is None and args.window == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--budget", "64", "--ratio", "0.5"])


def test_kvpress_paths_default_to_the_checkout(monkeypatch):
    monkeypatch.delenv("KVPRESS_VENV", raising=False)
    paths = compare.kvpress_paths()
    assert paths["script"] == SCRIPT and paths["setup"].name == "setup_env.sh"
    assert paths["python"] == compare.REPO_ROOT / ".venv-kvpress" / "bin" / "python"
    with pytest.raises(RuntimeError, match="not set up"):
        compare.ensure_kvpress_env(compare.kvpress_paths(venv=Path("/nonexistent/venv")), allow_setup=False)
