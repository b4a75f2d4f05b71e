"""Commands fail early and clearly: bad arguments and output paths before any model loads, messages
instead of tracebacks, Ctrl-C with the partial result saved."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv import MixKV, Profile, RandomKV, SnapKV, save_profile  # noqa: E402
from mixkv.cli import eval_cmd  # noqa: E402
from mixkv.cli.common import partial_json_path  # noqa: E402
from mixkv.cli.main import main  # noqa: E402
from mixkv.core.io import write_json_atomic  # noqa: E402
from mixkv.core.profiles import profile_from_json  # noqa: E402
from mixkv.lab import calibration as cal  # noqa: E402
from mixkv.lab.analyze import analyze  # noqa: E402
from mixkv.lab.evaluation import EvalConfig, EvalItem, evaluate  # noqa: E402
from mixkv.testbeds import sources  # noqa: E402


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("a model was loaded before the error"))


def _err(capsys) -> str:
    return capsys.readouterr().err


UNWRITABLE = "/proc/mixkv-no-such-dir/out.json"


@pytest.mark.parametrize("argv", [
    ["eval", "--json", UNWRITABLE],
    ["eval", "--plot", UNWRITABLE],
    ["bench", "--json", UNWRITABLE],
    ["demo", "--out", UNWRITABLE],
    ["calibrate", "--out", UNWRITABLE],
])
def test_unwritable_outputs_fail_before_loading(no_load, capsys, argv):
    assert main(argv) == 2
    assert "cannot write" in _err(capsys)


def test_output_path_that_is_a_directory(no_load, capsys, tmp_path):
    assert main(["eval", "--json", str(tmp_path)]) == 2
    assert "is a directory" in _err(capsys)


@pytest.mark.parametrize("argv, message", [
    (["bench", "--budget", "8"], "larger than the window"),
    (["bench", "--contexts", "64,1024", "--budget", "128"], "must all exceed the budget"),
    (["eval", "--budgets", "2" + "0" * 19], "budget"),
    (["eval", "--methods", "snapkv", "--profile", "missing.json"], "does not exist"),
    (["eval", "--model", "smollm"], "unknown model 'smollm'"),
    (["demo", "--model", "no-such-model"], "unknown model"),
    (["bench", "--model", "nope"], "unknown model"),
    (["bench", "--long-answer", "--decode-budget", "16"], "larger than the window"),
    (["bench", "--long-answer", "--contexts", "100", "--budget", "128"], "must exceed the budget"),
    (["bench", "--long-answer", "--methods", "nope"], "unknown method"),
    (["eval", "--followup"], "needs the toy VLM"),
    (["eval", "--followup", "--model", "toy-vlm", "--tasks", "colour"], "at least two tasks"),
    (["eval", "--followup", "--model", "toy-vlm", "--gap-plot", "g.png"], "--gap-plot does not apply to --followup"),
    (["calibrate", "--model", "nope", "--out", "x.json"], "unknown model"),
    (["calibrate", "--data", "missing.jsonl", "--out", "x.json"], "does not exist"),
    (["eval", "--tasks", "passkey,bogus"], "bogus"),
    (["analyze", "--out", "figs", "--budget", "16"], "exceed the window"),
    (["bench", "--micro", "--micro-layouts", "1x4x64"], "--micro-layouts: layout '1x4x64' has 1 KV head"),
    (["bench", "--micro", "--micro-layouts", "3x3"], "--micro-layouts: layout '3x3' is not KVHEADSxGROUPxHEADDIM"),
    (["bench", "--micro", "--micro-lengths", "1"], "--micro-lengths: mean tokens per head must be at least 2"),
    (["bench", "--micro", "--micro-batches", "0,1"], "--micro-batches: batch sizes must be positive"),
    (["bench", "--micro", "--micro-max-tokens", "10"], "no --micro setting fits --micro-max-tokens 10"),
])
def test_bad_arguments_fail_before_loading(no_load, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in _err(capsys)


def test_profile_that_no_method_uses_is_an_error(no_load, capsys, tmp_path):
    path = save_profile(Profile("m", 2, 2, key_redundancy=[[0.5, 0.5], [0.5, 0.5]]), tmp_path / "p.json")
    assert main(["eval", "--methods", "snapkv", "--profile", str(path)]) == 2
    assert "no method would use it" in _err(capsys)


def test_analyze_profile_without_key_redundancy(no_load, capsys, tmp_path):
    path = save_profile(Profile("m", 2, 2, head_scores=[[1.0, 1.0], [1.0, 1.0]]), tmp_path / "p.json")
    assert main(["analyze", "--out", str(tmp_path / "figs"), "--profile", str(path)]) == 2
    assert "no key_redundancy" in _err(capsys)


@pytest.mark.parametrize("argv", [["eval", "--n", "0"], ["eval", "--seed", "-1"], ["bench", "--steps", "0"],
                                  ["calibrate", "--n", "-3", "--out", "x.json"], ["eval", "--threads", "0"],
                                  ["eval", "--length", "1000,0"], ["eval", "--length", "1000,,2000"]])
def test_argparse_rejects_non_positive_counts(no_load, capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "expected" in _err(capsys)


def test_from_json_without_results(capsys, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"model": "m"}))
    assert main(["eval", "--from-json", str(bad)]) == 2
    assert "not a mixkv results file" in _err(capsys)
    bad.write_text("{truncated")
    assert main(["eval", "--from-json", str(bad)]) == 2
    assert "not valid JSON" in _err(capsys)


def test_analyze_wrong_shape_profile_writes_nothing(tmp_path):
    model = make_model("llama")  # 2 layers x 2 KV heads
    profile = Profile("other", 3, 2, key_redundancy=torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        analyze(model, [object()], tmp_path / "figs", model_name="tiny", budget=20, window=4, profile=profile)
    assert not (tmp_path / "figs").exists() or not any((tmp_path / "figs").iterdir())


# ---- API values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 3, 0.5, ["online"]])
def test_redundancy_must_be_online_or_a_profile(value):
    with pytest.raises(ValueError, match="redundancy"):
        MixKV(SnapKV(budget=64), redundancy=value)


@pytest.mark.parametrize("budget", [2**63, 2**40])
def test_absurd_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        SnapKV(budget=budget)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_random_seed_out_of_range(seed):
    with pytest.raises(ValueError, match="seed"):
        RandomKV(budget=64, seed=seed)


def _profile_json(**over):
    obj = {"format": "mixkv-profile", "version": 1, "model": "m", "num_layers": 2, "num_kv_heads": 2,
           "key_redundancy": [[0.1, 0.2], [0.3, 0.4]]}
    obj.update(over)
    return obj


@pytest.mark.parametrize("over, message", [
    ({"num_layers": 2.5}, "num_layers must be an integer"),
    ({"num_layers": "2"}, "num_layers must be an integer"),
    ({"num_kv_heads": 0}, "positive integer"),
    ({"key_redundancy": [[0.1, 1.3], [0.3, 0.4]]}, r"in \[0, 1\]"),
    ({"value_redundancy": [[-0.5, 0.2], [0.3, 0.4]]}, r"in \[0, 1\]"),
    ({"key_redundancy": [[0.1, 0.2]]}, "shape"),
])
def test_bad_profiles_are_refused(over, message):
    with pytest.raises(ValueError, match=message):
        profile_from_json(_profile_json(**over), "p.json")


# ---- calibration partial files ----------------------------------------------------------------------

@pytest.fixture
def calib_setup(tmp_path):
    model = make_model("llama")
    ids = torch.randint(8, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    samples = [cal.CalibrationSample(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})]
    out = tmp_path / "profile.json"
    return model, samples, out, cal.partial_path(out)


def _partial(state: dict, spec: dict) -> dict:
    return {"format": cal.PARTIAL_FORMAT, "model": "m", "spec": spec, "state": state}


def test_resume_from_truncated_partial_is_a_clear_error(calib_setup):
    model, samples, out, partial = calib_setup
    partial.write_text('{"format": "mixkv-calibration-part')
    with pytest.raises(ValueError, match="damaged"):
        cal.calibrate(model, samples, out, model_id="m", resume=True, progress=False)


def test_resume_from_inconsistent_partial_is_refused(calib_setup):
    model, samples, out, partial = calib_setup
    spec = {"data": {}, "max_new_tokens": 16, "hits_on": "answer", "n": 1}
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    state = {"num_layers": 2, "num_kv_heads": 2, "key_sum": [[1.23, 0.5], [0.2, 0.1]], "value_sum": zeros,
             "hits_sum": zeros, "prompts": 0, "steps": 0, "answered": 0, "done": []}
    partial.write_text(json.dumps(_partial(state, spec)))
    with pytest.raises(ValueError, match="damaged.*key_sum"):
        cal.calibrate(model, samples, out, model_id="m", resume=True, progress=False)
    partial.write_text(json.dumps(_partial(dict(state, key_sum=zeros, prompts=2, done=["a"]), spec)))
    with pytest.raises(ValueError, match="damaged"):
        cal.calibrate(model, samples, out, model_id="m", resume=True, progress=False)


# ---- Ctrl-C -----------------------------------------------------------------------------------------

def test_interrupted_evaluation_returns_what_it_measured():
    model = make_model("llama")
    ids = torch.randint(8, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    calls = []

    def score(text):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 1.0

    items = [EvalItem("t", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, score) for _ in range(3)]
    config = EvalConfig(methods=["full", "snapkv"], budgets=[12], max_new_tokens=2, window=4)
    out = evaluate(model, items, config, lambda toks: " ".join(map(str, toks)), progress=False)
    assert out["interrupted"] is True
    assert len(out["samples"]) == 2 and {r["method"] for r in out["results"]} == {"full", "snapkv"}


def _interrupted_eval(monkeypatch) -> None:
    """``eval`` without a model whose evaluation is cut short by Ctrl-C after the full cache's row."""
    fake_model = type("M", (), {"device": torch.device("cpu")})()
    fake_tok = type("T", (), {"eos_token_id": None, "decode": lambda self, ids, **k: ""})()
    monkeypatch.setattr(sources, "load", lambda *a, **k: (fake_model, fake_tok))
    monkeypatch.setattr(eval_cmd, "text_items", lambda *a, **k: [])
    monkeypatch.setattr(eval_cmd.task_suite, "make_suite", lambda *a, **k: [])
    partial = {"results": [{"task": "passkey", "method": "full", "budget": None, "accuracy": 1.0, "n": 1}],
               "samples": [], "interrupted": True, "timing": {}}
    monkeypatch.setattr(eval_cmd, "evaluate", lambda *a, **k: partial)


def test_eval_command_saves_partial_results_on_ctrl_c(monkeypatch, tmp_path, capsys):
    _interrupted_eval(monkeypatch)
    out = tmp_path / "eval.json"
    assert main(["eval", "--n", "1", "--length", "100", "--json", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and data["results"][0]["method"] == "full"
    assert not partial_json_path(out).exists()


def test_interrupted_eval_never_replaces_an_earlier_file(monkeypatch, tmp_path, capsys):
    _interrupted_eval(monkeypatch)
    out = tmp_path / "eval.json"
    complete = json.dumps({"results": [{"task": "passkey", "method": "snapkv", "budget": 64, "accuracy": 0.5}],
                           "interrupted": False})
    out.write_text(complete)
    assert main(["eval", "--n", "1", "--length", "100", "--json", str(out)]) == 130
    assert out.read_text() == complete
    partial = tmp_path / "eval.json.partial.json"
    assert json.loads(partial.read_text())["interrupted"] is True
    assert f"wrote {partial} (partial: interrupted; {out}, from an earlier run, left as it was)" \
        in capsys.readouterr().out


def test_followup_draws_the_plots(monkeypatch, tmp_path, capsys):
    """``--followup --plot --task-plot``: the follow-up answers' accuracy vs budget (nothing was drawn)."""
    from mixkv.lab import followup

    grid = [("full", None), ("snapkv", 64), ("snapkv", 128)]
    rows = [{"method": m, "budget": b, "turn": turn, "task": t, "n": 2, "accuracy": 50.0}
            for m, b in grid for turn in ("first", "followup") for t in ("colour", "shape", "text", "mean")]
    monkeypatch.setattr(sources, "load", lambda *a, **k: (object(), type("P", (), {"grid": 16})()))
    monkeypatch.setattr(followup, "followup_pairs", lambda n, *a: [object()] * n)
    monkeypatch.setattr(followup, "run_followup", lambda *a, **k: rows)
    plot, task_plot = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["eval", "--followup", "--model", "toy-vlm", "--n", "1", "--methods", "snapkv", "--budgets", "64,128",
            "--plot", str(plot), "--task-plot", str(task_plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {plot}" in out and f"wrote {task_plot}" in out
    assert plot.read_bytes()[:4] == task_plot.read_bytes()[:4] == b"\x89PNG"


def test_followup_results_as_eval_results():
    from mixkv.lab.followup import turn_results

    rows = [{"method": "snapkv", "budget": 64, "turn": turn, "task": "mean", "n": 4, "accuracy": acc}
            for turn, acc in (("first", 100.0), ("followup", 25.0))]
    assert turn_results(rows) == [{"task": "mean", "method": "snapkv", "budget": 64, "accuracy": 0.25, "n": 4}]


def test_method_from_third_party_file_works_under_press():
    """A modality-aware method is one small class: keep image tokens first (reads LayerPrefill.image_mask)."""
    from dataclasses import dataclass

    from mixkv.core import budgets

    @dataclass
    class ImageFirst(mixkv.BudgetedMethod):
        name = "image-first"

        def allocate(self, layer):
            return budgets.uniform_counts(self.candidates_per_sequence(layer), layer.n_cand, layer.num_kv_heads)

        def score(self, layer):
            s = layer.s_ext
            if layer.image_mask is not None:
                s = s + layer.image_mask[:, None, : layer.num_candidates].float()
            return s

    from zoo import make_inputs

    model = make_model("llava")
    inputs = make_inputs(model, "llava", text_len=30)
    image = inputs["input_ids"][0] == model.config.image_token_id
    with mixkv.press(model, ImageFirst(budget=24, window=4), record=True) as session:
        model.generate(**inputs, max_new_tokens=2)
    plan = session.plans[0]
    kept = plan.indices[0, 0, : int(plan.lengths[0, 0]) - 4]
    assert bool(image[kept].all()) and len(kept) == 20


# ---- output files -----------------------------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_json_output_follows_the_umask(umask_022, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["capacity", "--model", "Llama-3-8B", "--pool-gib", "1", "--prompt-tokens", "1000", "--json", str(out)]
    assert main(argv) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_rewritten_json_keeps_the_files_mode(umask_022, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    out.chmod(0o640)
    write_json_atomic({"a": 1}, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and json.loads(out.read_text()) == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]  # no temporary file left
