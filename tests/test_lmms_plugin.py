"""The lmms-eval plugin's parts that run without lmms-eval: model_args parsing, exporter, scorer, KV accounting.

What needs lmms-eval (registration in its model registry, the end-to-end agreement with `mixkv eval`) is
skipped here; it runs in its own venv: `make lmms-env` then `make lmms-check`.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from mixkv.core import defaults
from mixkv.core.cache import CompressedLayer
from mixkv.core.methods import MixKV, SnapKV
from mixkv.core.selection import KeepPlan
from mixkv.integrations.lmms_eval import manifests
from mixkv.integrations.lmms_eval.args import KEYS, PressArgs, split_model_args
from mixkv.integrations.lmms_eval.export import export, samples_for
from mixkv.integrations.lmms_eval.recorder import RowStats, full_kv_bytes, order_rows, row_kv_bytes
from mixkv.integrations.lmms_eval.tasks.toyvlm import utils as task_utils
from mixkv.testbeds.toyvlm import generator as gen

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
NEEDS_LMMS = pytest.mark.skipif(not HAS_LMMS, reason="needs lmms-eval in its own venv: run `make lmms-env` "
                                                     "then `make lmms-check`")


# ---- model_args -> method -------------------------------------------------------------------------------

def test_parse_builds_the_named_method():
    args = PressArgs.parse(method="snapkv+mixkv", budget=64)
    method = args.make()
    assert isinstance(method, MixKV) and isinstance(method.base, SnapKV)
    assert method.base.budget == 64 and method.base.window == defaults.WINDOW
    assert args.label == "snapkv+mixkv@64"


def test_parse_defaults_and_lmms_value_types():
    assert PressArgs.parse().label == f"snapkv+mixkv@{defaults.BUDGET}"  # press's default budget
    assert PressArgs.parse(method="SnapKV", budget=128.0, window="16").budget == 128  # lmms-eval may give floats
    ratio = PressArgs.parse(method="snapkv", ratio=0.25)
    assert ratio.budget is None and ratio.make().ratio == 0.25 and ratio.label == "snapkv@r0.25"
    full = PressArgs.parse(method="full")
    assert full.make() is None and full.label == "full"


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "snapkv+nope"}, "not a mixkv method"),
    ({"method": 3}, "not a mixkv method"),
    ({"method": "full", "budget": 64}, "method=full compresses nothing"),
    ({"budget": 64, "ratio": 0.5}, "not both"),
    ({"budget": 0}, "positive integer"),
    ({"budget": True}, "positive integer"),
    ({"budget": 64.5}, "positive integer"),
    ({"budget": "lots"}, "positive integer"),
    ({"ratio": 0}, "in (0, 1]"),
    ({"ratio": "half"}, "in (0, 1]"),
    ({"budget": 16, "window": 32}, "larger than window"),
    ({"profile": "/no/such/profile.json"}, "not a file"),
    ({"redundancy": "offline"}, "'online' or 'profile'"),
    ({"method": "sparsemm", "budget": 64}, "calibration profile"),
    ({"bugdet": 64}, "unknown mixkv argument"),
])
def test_parse_errors_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        PressArgs.parse(**kwargs)


def test_split_model_args_leaves_the_rest_to_lmms_eval():
    ours, rest = split_model_args({"pretrained": "Qwen/Qwen2.5-VL-7B-Instruct", "method": "adakv+mixkv",
                                   "budget": 128, "batch_size": 4, "max_pixels": 12845056})
    assert ours.label == "adakv+mixkv@128"
    assert rest == {"pretrained": "Qwen/Qwen2.5-VL-7B-Instruct", "batch_size": 4, "max_pixels": 12845056}
    assert set(KEYS) >= {"method", "budget", "ratio", "window", "profile"}


# ---- registration (names only; the registry itself needs lmms-eval) -----------------------------------------

def test_class_names_round_trip_and_families_are_unique():
    ids = [f.base_id for f in manifests.FAMILIES]
    assert len(ids) == len(set(ids)) and "qwen2_5_vl" in ids and "toy_vlm" in ids
    for f in manifests.FAMILIES:
        for kind in ("simple", "chat"):
            assert manifests.parse_class_name(manifests.class_name(f.base_id, kind)) == (f.base_id, kind)
    assert manifests.parse_class_name("MixKV_unknown__chat") is None
    assert manifests.parse_class_name("Qwen2_5_VL") is None


def test_plugin_modules_import_without_lmms_eval():
    if HAS_LMMS:
        pytest.skip("lmms-eval is installed here; this checks the default install")
    import mixkv.integrations.lmms_eval  # noqa: F401
    assert "lmms_eval" not in sys.modules and "loguru" not in sys.modules


@NEEDS_LMMS
def test_lmms_eval_registry_resolves_mixkv_models():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    assert MODEL_REGISTRY_V2.resolve("mixkv_qwen2_5_vl").model_type == "chat"
    cls = get_model("mixkv_toy_vlm")
    assert cls.__name__ == manifests.class_name("toy_vlm", "simple") and cls.is_simple


# ---- exporter and task functions ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyvlm-task")
    return out, export(out, n=3, seed=7, tasks=("colour", "text"))


def test_export_writes_the_samples_mixkv_eval_uses(exported):
    out, written = exported
    assert set(written) == {"colour", "text"}
    for task, path in written.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        # mixkv eval --model toy-vlm --seed 7 --n 3: make_sample(seed + i, task=t)
        want = [gen.make_sample(7 + i, task=task) for i in range(3)]
        assert [r["doc_id"] for r in rows] == [0, 1, 2]
        assert [(r["seed"], r["question"], r["answer"]) for r in rows] == [(s.seed, s.question, s.answer) for s in want]
        for r, s in zip(rows, want):
            image = task_utils.toyvlm_doc_to_visual(r)
            assert len(image) == 1 and np.array_equal(np.asarray(image[0]), np.asarray(s.image))  # lossless
            assert task_utils.toyvlm_doc_to_text(r, {"pre_prompt": "", "post_prompt": ""}) == s.question
    assert {p.name for p in out.glob("*.yaml")} == {"toyvlm.yaml", "toyvlm_colour.yaml", "toyvlm_shape.yaml",
                                                    "toyvlm_text.yaml", "toyvlm_count.yaml"}
    assert (out / "_default_template_yaml").is_file()
    assert json.loads((out / "export.json").read_text()) == {"n": 3, "seed": 7, "tasks": ["colour", "text"]}


def test_export_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown toy-vlm task"):
        samples_for(("colour", "size"), 2, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        export(tmp_path, n=0)


def test_task_yaml_names_functions_that_exist():
    text = (manifests.__file__.rsplit("/", 1)[0] + "/tasks/toyvlm/_default_template_yaml")
    with open(text) as fh:
        body = fh.read()
    names = [line.split("!function ", 1)[1].strip() for line in body.splitlines() if "!function " in line]
    assert len(names) == 3
    for name in names:
        module, _, fn = name.rpartition(".")
        assert module == task_utils.__name__ and callable(getattr(task_utils, fn))
    assert "max_new_tokens: 20" in body  # mixkv eval's default


TEXTS = ["The star is red.", "The red shape is a star.", "The text says K7P2.", "the STAR is Red", "blue? no, red",
         "The text says k7p2.", "", "There are 4 shapes.", "The text says K7P2K.", "red red red"]


def test_scorer_equals_mixkv_eval_scorer():
    for seed in range(12):
        for task in gen.TASKS:
            s = gen.make_sample(seed, task=task)
            doc = {"seed": s.seed, "task": task, "question": s.question, "answer": s.answer}
            for text in TEXTS + [s.reply, s.reply.lower(), f"It is {s.answer}."]:
                assert task_utils.toyvlm_process_results(doc, [text]) == {"accuracy": gen.score(s, text)}


def test_scorer_refuses_rows_the_generator_disagrees_with():
    s = gen.make_sample(3, task="colour")
    doc = {"seed": 3, "task": "colour", "question": s.question, "answer": "not-" + s.answer}
    with pytest.raises(ValueError, match="export the data again"):
        task_utils.toyvlm_process_results(doc, [s.reply])


# ---- per-sample KV bytes and request order -----------------------------------------------------------------

def test_row_kv_bytes_count_kept_tokens_and_exclude_padding():
    k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    lengths = torch.tensor([[5, 3, 4], [2, 5, 5]])
    compressed = CompressedLayer(k, v, KeepPlan(torch.arange(5).expand(2, 3, 5).clone(), lengths), prompt_length=10)
    dense = DynamicLayer()
    dense.update(k, v)

    class Cache:
        layers = [compressed, dense]

    unit = 2 * 4 * 4  # keys + values, head_dim 4, float32
    # row 1 is left-padded: 7 real tokens of 10
    assert row_kv_bytes(Cache, [10, 7]) == [12 * unit + 10 * 3 * unit, 12 * unit + 7 * 3 * unit]
    assert sum(row_kv_bytes(type("C", (), {"layers": [compressed]}), [10, 7])) == compressed.kv_bytes()
    assert full_kv_bytes(Cache, [10, 7]) == [2 * 10 * 3 * unit, 2 * 7 * 3 * unit]


def test_order_rows_follows_the_collator_permutation():
    rows = [RowStats(kv_bytes=i, kv_bytes_full=9, prompt_tokens=1, compress_seconds=0.0, batch_rows=1)
            for i in range(3)]
    # original request i was generated as row perm[i]
    assert [r.kv_bytes for r in order_rows(rows, [[2, 0, 1]], 3)] == [2, 0, 1]
    assert [r.kv_bytes for r in order_rows(rows, [], 3)] == [0, 1, 2]  # no reordering: generation order
    assert order_rows(rows, [], 4) is None  # not one row per request: refuse to guess
    assert order_rows(rows, [[0, 1, 2], [0, 1, 2]], 3) is None
