"""``mixkv compare``: prompt export, budget matching, aggregation, ratios and tables on fake data.

No kvpress venv and no real model: the kvpress runner script (package data of
``mixkv.lab.compare.kvpress``) is imported only for its pure helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from mixkv.lab import compare
from mixkv.testbeds import tasks

SCRIPTS = resources.files("mixkv.lab.compare.kvpress")
SCRIPT = Path(str(SCRIPTS / "run_kvpress.py"))
REPO = Path(__file__).resolve().parents[1]


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


# ---- the mixkv side ----------------------------------------------------------------------------------

def test_measure_mixkv_one_times_every_step_and_cuts_the_answer_at_eos():
    import torch
    from zoo import make_model

    from mixkv.core.press import press

    model = make_model("llama")
    ids = torch.randint(8, 256, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = {"id": "200/passkey/0", "context": 200, "task": "passkey", "input_ids": ids}
    settings = {"budget": 64, "compression_ratio": None, "window": 16, "max_new_tokens": 4, "decode_steps": 6}
    full = compare.measure_mixkv_one(model, prompt, "full", settings)
    snap = compare.measure_mixkv_one(model, prompt, "snapkv", settings)
    for r in (full, snap):
        assert len(r["decode_tokens"]) == 6 and len(r["decode_step_ms"]) == 5  # every step after the prefill's
        assert r["tokens"] == r["decode_tokens"][:4] and r["decode_ms_per_token"] > 0
        assert r["peak_rss_mib"] is None or r["peak_rss_mib"] >= r["rss_before_mib"]
    assert full["budget"] is None and full["kept_per_head"] == 200 and full["kept"] is None
    assert snap["budget"] == 64 and snap["kv_bytes"] < full["kv_bytes"]
    assert snap["kept_counts"] == [[64, 64]] * 2 and [len(h) for h in snap["kept"][0]] == [64, 64]
    # the decode loop is the plain greedy one, decoding on past EOS for timing
    with torch.no_grad(), press(model, "snapkv", budget=64, window=16):
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        while len(tokens) < 6:
            step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
            tokens.append(int(step.logits[0, -1].argmax()))
    assert snap["decode_tokens"] == tokens
    eos = snap["decode_tokens"][1]
    cut = compare.measure_mixkv_one(model, prompt, "snapkv", dict(settings, eos_token_ids=[eos]))
    first = snap["decode_tokens"].index(eos)
    assert cut["tokens"] == snap["decode_tokens"][: first + 1] and cut["decode_tokens"] == snap["decode_tokens"]
    ada = compare.measure_mixkv_one(model, prompt, compare.ADAKV_AS_KVPRESS, settings, record_kept=False)
    assert ada["kept"] is None and [sum(c) for c in ada["kept_counts"]] == [128, 128]


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


def _cli_args(*argv: str) -> argparse.Namespace:
    from mixkv.cli import compare as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compare", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--json", "{tmp}"], "is a directory"),
    (["--plot", "{tmp}/a-file/c.png"], "cannot write"),
    (["--gguf", "{tmp}/missing.gguf"], "not a file"),
    (["--model", "other"], "pass --gguf"),
    (["--methods", "snapkv,pyramidkv"], "unknown method"),
    (["--budget", "32"], "must exceed the window"),
    (["--ratio", "1.0"], "in \\[0, 1\\)"),
    (["--contexts", "1024,-5"], "positive"),
    (["--decode-steps", "0"], "at least 1"),
    (["--kvpress-results", "{tmp}/none.json"], "not a file"),
])
def test_cli_checks_arguments_before_loading_anything(argv, message, tmp_path, monkeypatch):
    from mixkv.cli import compare as cli

    monkeypatch.setattr(compare, "run_compare", lambda **kw: pytest.fail("run_compare was called"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=message):
        cli.run(_cli_args(*(a.format(tmp=tmp_path) for a in argv)))


def test_cli_runs_the_comparison_and_writes_json_and_work_dir_next_to_it(tmp_path, monkeypatch, capsys):
    from mixkv.cli import compare as cli

    calls = {}
    spec = {"settings": {"budget": 128}, "prompts": [
        {"id": "p0", "context": 1024, "task": "passkey", "answer": "7", "answer_kind": "number", "choices": None,
         "input_ids": [1]}]}
    kvp = {"format": compare.KVPRESS_FORMAT, "versions": {"kvpress": "0.5.5", "transformers": "5.2.0"},
           "runs": [dict(_run("kvpress", "snapkv", pid="p0"), text="7")]}

    def fake_run_compare(**kw):
        calls.update(kw)
        return compare.build_report(spec, [dict(_run("mixkv", "snapkv", pid="p0"), text="7")], kvp, extra={
            "mixkv_versions": {"transformers": "5.24"}, "machine": "test box"})

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    monkeypatch.setattr("mixkv.lab.machine.setup_threads", lambda threads: threads or 1)
    out = tmp_path / "res" / "c.json"
    assert cli.run(_cli_args("--json", str(out), "--kvpress-venv", str(tmp_path / "v"), "--threads", "2")) == 0
    assert json.loads(out.read_text())["rows"][0]["mixkv_accuracy"] == 1.0
    assert calls["work_dir"] == tmp_path / "res" / "c" and calls["kvpress_venv"] == tmp_path / "v"
    assert calls["budget"] == 128 and calls["threads"] == 2 and calls["methods"] == ["full", "snapkv", "adakv"]
    assert "kvpress 0.5.5 on transformers 5.2.0" in capsys.readouterr().out


def test_kvpress_scripts_are_package_resources_and_the_venv_is_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("KVPRESS_VENV", raising=False)
    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path / "cache"))
    paths = compare.kvpress_paths()
    assert paths["script"] == SCRIPT and paths["script"].is_file()
    assert paths["setup"] == Path(str(SCRIPTS / "setup_env.sh")) and paths["setup"].is_file()
    assert paths["venv"] == compare.default_venv() == tmp_path / "cache" / "venv-kvpress"
    assert paths["python"] == tmp_path / "cache" / "venv-kvpress" / "bin" / "python"
    monkeypatch.delenv("MIXKV_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compare.default_venv() == tmp_path / "home" / ".cache" / "mixkv" / "venv-kvpress"
    assert REPO not in compare.default_venv().parents
    monkeypatch.setenv("KVPRESS_VENV", str(tmp_path / "mine"))
    assert compare.kvpress_paths()["venv"] == tmp_path / "mine"
    assert compare.kvpress_paths(tmp_path / "given")["python"] == tmp_path / "given" / "bin" / "python"
    with pytest.raises(RuntimeError, match="not set up"):
        compare.ensure_kvpress_env(compare.kvpress_paths(venv=Path("/nonexistent/venv")), allow_setup=False)


FAKE_BASE_PYTHON = """#!/usr/bin/env bash
echo "base $*" >> "$FAKE_LOG"
[[ "$1 $2" == "-m venv" ]] || exit 3
dir="${*: -1}"
[[ "$3" == "--clear" ]] && rm -rf "$dir"
mkdir -p "$dir/bin"
echo "include-system-site-packages = false" > "$dir/pyvenv.cfg"
cp "$FAKE_VENV_PYTHON" "$dir/bin/python"
"""
FAKE_VENV_PYTHON = """#!/usr/bin/env bash
echo "venv $*" >> "$FAKE_LOG"
case "$1" in
    -m) echo "Successfully installed ${*: -1}" ;;
    -c) echo "2.13.0+cpu" ;;
    -) cat > /dev/null; echo "kvpress 0.5.5, transformers 5.2.0, torch 2.13.0+cpu" ;;
esac
"""


def _fake_setup_env(tmp_path: Path, **env: str) -> tuple[dict, Path]:
    """Environment running setup_env.sh against stub interpreters that log their arguments (no pip, no venv)."""
    for name, text in (("python-base", FAKE_BASE_PYTHON), ("python-venv", FAKE_VENV_PYTHON)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    log = tmp_path / "calls.log"
    base = {k: v for k, v in os.environ.items()
            if k not in ("KVPRESS_VENV", "MIXKV_CACHE", "KVPRESS_TORCH", "KVPRESS_SPEC", "KVPRESS_TRANSFORMERS")}
    return dict(base, PYTHON=str(tmp_path / "python-base"), FAKE_VENV_PYTHON=str(tmp_path / "python-venv"),
                FAKE_LOG=str(log), HOME=str(tmp_path / "home"), **env), log


def test_setup_script_installs_torch_then_kvpress_into_an_isolated_venv(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    setup = str(compare.kvpress_paths()["setup"])
    env, log = _fake_setup_env(tmp_path, MIXKV_CACHE=str(tmp_path / "cache"))
    venv = tmp_path / "cache" / "venv-kvpress"  # the default: the same rule as kvpress_side.default_venv
    subprocess.run(["bash", setup], env=env, check=True, capture_output=True, text=True)
    calls = log.read_text().splitlines()
    assert calls[0] == f"base -m venv {venv}"  # no --system-site-packages: nothing inherited
    pip = [c for c in calls if c.startswith("venv -m pip install")]
    assert pip[0].split()[-1] == "torch==2.13.0"  # torch first, at the CPU pin
    assert pip[1].endswith(f"-c {venv}/constraints.txt kvpress==0.5.5 transformers==5.2.0 gguf")
    assert (venv / "constraints.txt").read_text() == "torch==2.13.0+cpu\n"  # the installed torch is kept
    assert (venv / ".kvpress-setup").read_text().split() == ["torch==2.13.0", "kvpress==0.5.5",
                                                             "transformers==5.2.0", "gguf"]
    again = subprocess.run(["bash", setup], env=env, check=True, capture_output=True, text=True)
    assert "already set up" in again.stdout and log.read_text().count("pip install") == 2
    # a venv made by the old script (inheriting site-packages) is rebuilt, not reused
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
    (venv / ".kvpress-setup").unlink()
    subprocess.run(["bash", setup], env=env, check=True, capture_output=True, text=True)
    assert f"base -m venv --clear {venv}" in log.read_text().splitlines()
    # KVPRESS_VENV wins over the cache
    env, log = _fake_setup_env(tmp_path, KVPRESS_VENV=str(tmp_path / "elsewhere"))
    subprocess.run(["bash", setup], env=env, check=True, capture_output=True, text=True)
    assert (tmp_path / "elsewhere" / ".kvpress-setup").is_file()


def test_setup_script_is_valid_bash_and_never_inherits_site_packages():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    setup = compare.kvpress_paths()["setup"]
    subprocess.run(["bash", "-n", str(setup)], check=True)
    code = [line for line in setup.read_text().splitlines() if not line.lstrip().startswith("#")]
    venv_commands = [line for line in code if "-m venv" in line]
    assert venv_commands and not any("--system-site-packages" in line for line in venv_commands)
    assert any("torch==2.13.0" in line for line in code) and any("kvpress==0.5.5" in line for line in code)
