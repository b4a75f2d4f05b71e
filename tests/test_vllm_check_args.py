"""``scripts/vllm_check.py``'s arguments and results file, without vLLM: the parts are chosen by name
(the letters of earlier notes still work), and a results file written by earlier runs still merges."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ["no-op", "press-equal", "capacity", "paging-cost", "preemption", "tensor-parallel", "serve-http"]


@pytest.fixture(scope="module")
def check():
    """The script as a module; it imports its sibling ``vllm_serve`` and defines dataclasses, so scripts/ is on
    the path and the module in ``sys.modules`` meanwhile."""
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("vllm_check", REPO / "scripts" / "vllm_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_check"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "scripts"))
        sys.modules.pop("vllm_check", None)
        sys.modules.pop("vllm_serve", None)
        sys.modules.pop("vllm_jobs", None)


def test_every_part_runs_by_default_in_order(check):
    assert list(check.PARTS) == NAMES
    assert check.parse_args([]).parts == NAMES


@pytest.mark.parametrize(("asked", "parts"), [
    ("serve-http,no-op", ["no-op", "serve-http"]),  # run in the fixed order, whatever the order asked
    ("capacity", ["capacity"]),
    ("paging-cost, preemption", ["paging-cost", "preemption"]),
    (",".join(NAMES), NAMES),
])
def test_parts_are_chosen_by_name(check, asked, parts):
    assert check.parse_args(["--parts", asked]).parts == parts


@pytest.mark.parametrize(("asked", "parts"), [
    ("a,b,c,d,e,f,serve-http", NAMES),  # the old default
    ("a,b", ["no-op", "press-equal"]),
    ("e", ["preemption"]),
    ("f,d", ["paging-cost", "tensor-parallel"]),
    ("c,capacity", ["capacity"]),  # a letter and its name are one part
])
def test_old_letters_are_aliases_of_the_names(check, asked, parts):
    assert check.parse_args(["--parts", asked]).parts == parts


def test_the_help_names_the_parts_and_their_letters(check, capsys):
    with pytest.raises(SystemExit):
        check.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    for name in NAMES:
        assert name in text
    for letter, name in check.LETTERS.items():
        assert f"{letter}={name}" in text


@pytest.mark.parametrize("asked", ["g", "no-op,g", "press", "noop", "", "a,,b", "A"])
def test_unknown_parts_are_refused(check, capsys, asked):
    with pytest.raises(SystemExit) as info:
        check.parse_args(["--parts", asked])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--parts: unknown" in err and "no-op, press-equal, capacity" in err and "a=no-op" in err


def test_runs_recorded_with_letters_stay_as_written(check):
    """The recorded results (runs listed by letter) gain a new run by name; a run of every part starts over."""
    old = json.loads((REPO / "results" / "vllm-capacity.json").read_text())
    report = copy.deepcopy(old)
    check.record_run(report, ["no-op", "serve-http"], "scripts/vllm_check.py --parts no-op,serve-http", True)
    assert report["runs"][:-1] == old["runs"]
    assert report["runs"][-1]["parts"] == "no-op,serve-http" and report["runs"][-1]["ok"] is True
    assert {k: v for k, v in report.items() if k != "runs"} == {k: v for k, v in old.items() if k != "runs"}
    check.record_run(report, NAMES, "scripts/vllm_check.py", False)
    assert [r["parts"] for r in report["runs"]] == [",".join(NAMES)]


def test_recorded_capacity_rows_merge_with_a_new_run(check):
    """A capacity run on the same pool and prompts replaces only the rows it reran."""
    old = json.loads((REPO / "results" / "vllm-capacity.json").read_text())["capacity"]
    rerun = {**old["rows"][1], "max_running": 14}
    new = {**{k: old[k] for k in ("pool_bytes", "prompt_tokens", "output_tokens")}, "rows": [rerun]}
    merged = check.merge_capacity(copy.deepcopy(old), new)
    assert [(r["method"], r["budget"]) for r in merged["rows"]] == [(r["method"], r["budget"]) for r in old["rows"]]
    assert merged["rows"][1]["max_running"] == 14
    assert [r["max_running"] for i, r in enumerate(merged["rows"]) if i != 1] == \
        [r["max_running"] for i, r in enumerate(old["rows"]) if i != 1]


def test_capacity_settings_and_other_prompts_do_not_merge(check, capsys):
    assert check.capacity_setting("full", "snapkv+mixkv") == ("full", None)
    assert check.capacity_setting("256", "snapkv+mixkv") == ("snapkv+mixkv", 256)
    assert check.capacity_setting("headkv+mixkv@512", "snapkv+mixkv") == ("headkv+mixkv", 512)
    args = check.parse_args(["--cap-requests", "full:2,adakv@512:8", "--cap-tasks", "passage_qa,passkey"])
    assert args.cap_tasks == ["passage_qa", "passkey"]
    old = json.loads((REPO / "results" / "vllm-capacity.json").read_text())["capacity"]
    new = {**{k: old[k] for k in ("pool_bytes", "prompt_tokens", "output_tokens")}, "tasks": ["passage_qa"],
           "seed": 2, "rows": [old["rows"][0]]}
    assert check.merge_capacity(copy.deepcopy(old), new) == new  # other prompts: nothing of the old run kept
    for argv, message in ((["--cap-requests", "full:2,nope@64:3"], "unknown ['nope']"),
                          (["--cap-requests", "full:2,snapkv@x:3"], "keys are 'full'"),
                          (["--cap-tasks", "passkey,bogus"], "--cap-tasks: unknown ['bogus']")):
        with pytest.raises(SystemExit):
            check.parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_job_runs_in_a_fresh_interpreter_and_its_failure_shows_the_log(check, tmp_path):
    """The launcher both check scripts share (scripts/vllm_jobs.py), with a stand-in job script (no vLLM)."""
    import vllm_jobs

    script = tmp_path / "job.py"
    script.write_text(
        "import json, sys\n"
        "spec = json.load(open(sys.argv[2]))\n"
        "if spec['plugin_env'].get('FAIL'):\n"
        "    print('engine exploded'); sys.exit(3)\n"
        "json.dump({'load_seconds': 1.0, 'generate_seconds': 2.0, 'env': spec['plugin_env']}, open(spec['out'], 'w'))\n"
    )
    ok = check.Job({"MIXKV_VLLM_METHOD": "snapkv"}, {}, [[1, 2]], 4, str(tmp_path / "ok.json"))
    result = vllm_jobs.launch(ok, "ok", str(script))
    assert result["env"] == {"MIXKV_VLLM_METHOD": "snapkv"} and result["log"].endswith("ok.log")
    bad = check.Job({"FAIL": "1"}, {}, [[1]], 4, str(tmp_path / "bad.json"))
    with pytest.raises(RuntimeError, match=r"(?s)exit 3.*engine exploded"):
        vllm_jobs.launch(bad, "bad", str(script))
