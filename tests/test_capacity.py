"""``mixkv capacity``: hand-checked numbers on a tiny shape, the named public shapes, config.json
reading, block rounding, the PyramidKV schedule against the core's, errors, and the command."""

from __future__ import annotations

import ast
import fnmatch
import json
import math
import re
from pathlib import Path

import pytest
import torch

from mixkv.cli import capacity as cli_capacity
from mixkv.cli.main import main
from mixkv.core import budgets as core_budgets
from mixkv.core import registry
from mixkv.serving import capacity, shapes
from mixkv.serving.capacity import Pool, Workload, fit, plan, plan_row, pyramid_kept
from mixkv.serving.shapes import ModelShape

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "src" / "mixkv" / "serving"

# Two layers, two KV heads, head dim 4, fp16: one token of one head is 2 (K, V) x 4 x 2 B = 16 B.
TINY = ModelShape("tiny", num_layers=2, num_kv_heads=2, head_dim=4)
TOKEN_HEAD = 16
POOL_BYTES = 70_400
BLOCK = 8
PAGE = 2 * 2 * 4 * BLOCK * 2  # one layer's block: K and V of both heads for 8 slots = 256 B
BLOCK_IDS = POOL_BYTES // (2 * PAGE) - 1  # 137 block ids (each spans both layers), one kept aside by vLLM


def tiny_pool(prefilling: int = 1) -> Pool:
    return Pool(POOL_BYTES / capacity.GIB, "fp16", BLOCK, prefilling)


WORK = Workload(prompt_tokens=100, output_tokens=10, window=4)


# ---- hand-checked numbers -----------------------------------------------------------------------

def test_full_cache_by_hand():
    row = plan_row(TINY, WORK, tiny_pool(), "full", None)
    assert row.held_per_head == 110
    assert row.transformers.bytes_per_request == 110 * 2 * 2 * TOKEN_HEAD == 7040
    assert row.transformers.requests == POOL_BYTES // 7040 == 10
    # paged: ceil(110 / 8) = 14 blocks in each layer
    assert row.paged.bytes_per_request == 14 * 2 * PAGE
    assert row.paged.requests == BLOCK_IDS // 14 == 9


def test_uniform_budget_by_hand():
    row = plan_row(TINY, WORK, tiny_pool(), "snapkv+mixkv", 20)
    assert (row.kind, row.kept_per_head, row.held_per_head) == ("uniform", 20, 30)
    assert row.transformers.bytes_per_request == 30 * 4 * TOKEN_HEAD == 1920
    assert row.transformers.requests == 36
    # paged: ceil(30 / 8) = 4 blocks; one request still holds its prompt, ceil(100 / 8) = 13 blocks
    assert row.paged.bytes_per_request == 4 * 2 * PAGE
    assert row.paged.requests == 31  # 13 + 30 x 4 = 133 <= 136 block ids; 32 requests would need 137
    assert plan_row(TINY, WORK, tiny_pool(prefilling=0), "snapkv", 20).paged.requests == BLOCK_IDS // 4


def test_pyramid_by_hand():
    # base 16, min 16 / 20 = 0.8, max 31.2: layer 0 keeps 31 + 4, layer 1 keeps 0 + 4
    assert pyramid_kept(100, 20, 4, 2, 20.0) == [35, 4]
    row = plan_row(TINY, WORK, tiny_pool(), "pyramidkv", 20)
    assert row.kind == "per-layer" and row.held_per_head == (45 + 14) / 2
    assert row.transformers.bytes_per_request == (45 + 14) * 2 * TOKEN_HEAD
    # the vLLM plugin packs the kept prompt: (35 + 4) tokens per head over 2 layers x 2 heads, 16 tiles of 8 per
    # block -> ceil(39 / 16) = 3 blocks; the 10 outputs in ceil(10 / 8) = 2 more; the prefilling one holds 13
    assert row.paged.bytes_per_request == 5 * 2 * PAGE
    assert row.paged.requests == (BLOCK_IDS - (13 - 5)) // 5
    assert row.paged_per_layer == row.paged and row.padded is None


def test_per_head_budgets_by_hand():
    row = plan_row(TINY, WORK, tiny_pool(), "adakv", 20)
    assert row.kind == "per-head"
    assert row.transformers.bytes_per_request == 1920  # on average the budget per head: same bytes as SnapKV
    # packed: 20 per head on average, ceil(2 * 20 / 16) = 3 blocks, + 2 for the outputs, whatever the skew
    assert row.paged.bytes_per_request == 5 * 2 * PAGE and row.paged.requests == (BLOCK_IDS - 8) // 5
    assert row.padded is None
    sized = plan_row(TINY, WORK, tiny_pool(), "headkv+mixkv", 20, max_head_ratio=3)
    assert sized.paged == row.paged and sized.transformers.bytes_per_request == 1920
    # padded to the largest head (60 prompt tokens + 10 outputs): ceil(70 / 8) = 9 blocks in every layer
    assert sized.padded.bytes_per_request == 9 * 2 * PAGE


def test_decode_budget_bounds_the_growth():
    long = Workload(prompt_tokens=100, output_tokens=50, window=4, decode_budget=30, decode_every=8)
    assert plan_row(TINY, long, tiny_pool(), "snapkv", 20).held_per_head == 38  # 30 + 8, not 20 + 50
    short = Workload(prompt_tokens=100, output_tokens=5, window=4, decode_budget=30, decode_every=8)
    assert plan_row(TINY, short, tiny_pool(), "snapkv", 20).held_per_head == 25  # never reached the cap
    assert plan_row(TINY, long, tiny_pool(), "full", None).held_per_head == 150  # the full cache is not compressed
    tight = Workload(prompt_tokens=100, output_tokens=50, window=4, decode_budget=10, decode_every=4)
    # 20 kept grow by `every` before the first cut to 10 (a layer is re-compressed at most once per `every`)
    assert plan_row(TINY, tight, tiny_pool(), "snapkv", 20).held_per_head == 24
    # PyramidKV: each layer's cap follows its own schedule at the decode budget (lower layers keep more)
    pyr = plan_row(TINY, long, tiny_pool(), "pyramidkv", 20)
    kept = pyramid_kept(100, 20, 4, TINY.num_layers)
    alloc = pyramid_kept(150, 30, 4, TINY.num_layers)
    want = [min(k + 50, max(k, a, 30) + 8) for k, a in zip(kept, alloc, strict=True)]
    assert pyr.held_per_head == sum(want) / TINY.num_layers


def test_prompt_that_fits_the_budget_is_kept_whole():
    work = Workload(prompt_tokens=50, output_tokens=0, window=4)
    for method in ("snapkv", "pyramidkv", "adakv"):
        row = plan_row(TINY, work, tiny_pool(), method, 64)
        assert row.kept_per_head == 50 and row.paged.requests is not None
    p = plan(TINY, work, tiny_pool(), ["snapkv"], [64])
    assert any("nothing is compressed" in n for n in p.notes)


# ---- block rounding and fitting ----------------------------------------------------------------

@pytest.mark.parametrize("held, block, blocks", [(1, 16, 1), (16, 16, 1), (17, 16, 2), (320, 16, 20), (321, 16, 21),
                                                 (17, 1, 17)])
def test_block_rounding(held, block, blocks):
    work = Workload(prompt_tokens=held, output_tokens=0, window=4)  # a full cache holding `held` tokens
    pool = Pool(1.0, "bf16", block)
    row = plan_row(TINY, work, pool, "full", None)
    assert row.paged.bytes_per_request == blocks * 2 * (2 * 2 * 4 * block * 2)


def test_block_size_one_is_the_packed_layout():
    row = plan_row(TINY, WORK, Pool(1.0, "bf16", 1, prefilling=0), "snapkv", 20)
    assert row.paged.bytes_per_request == row.transformers.bytes_per_request


def test_fit():
    assert fit(100, 10, 0, 3) == 10
    assert fit(100, 10, 40, 1) == 7  # 40 + 6 x 10 = 100
    assert fit(100, 10, 40, 2) == 4  # 2 x 40 + 2 x 10
    assert fit(30, 10, 40, 1) == 0  # not even one prompt fits
    assert fit(100, 10, 40, 0) == 10


# ---- the PyramidKV schedule is the core's ---------------------------------------------------------

@pytest.mark.parametrize("num_layers", [1, 2, 28, 36])
@pytest.mark.parametrize("beta", [20.0, 2.5])
def test_pyramid_schedule_agrees_with_the_core(num_layers, beta):
    window = 32
    for prompt in (40, 100, 300, 1000, 4096):
        for budget in (33, 64, 128, 256):
            cand, n_cand = torch.tensor([budget - window]), torch.tensor([prompt - window])
            core = [int(core_budgets.pyramid_counts(cand, n_cand, layer, num_layers, 2, beta)[0, 0]) + window
                    for layer in range(num_layers)]
            assert pyramid_kept(prompt, budget, window, num_layers, beta) == core, (prompt, budget)


def test_every_registered_method_has_a_budget_kind():
    for name in registry.available_methods():
        assert capacity.budget_kind(name) in {"full", "uniform", "per-layer", "per-head"}
    assert capacity.budget_kind("sparsemm+mixkv") == "per-head"
    with pytest.raises(ValueError, match="does not know"):
        capacity.budget_kind("h2o")


# ---- named shapes and config.json ---------------------------------------------------------------

KNOWN = {  # layers, KV heads, head dim of the language model, from each model's config.json
    "Qwen2-VL-7B": (28, 4, 128),
    "Qwen2.5-VL-3B": (36, 2, 128),
    "Qwen2.5-VL-7B": (28, 4, 128),
    "LLaVA-1.5-7B": (32, 32, 128),
    "LLaVA-NeXT-Mistral-7B": (32, 8, 128),
    "InternVL3-8B": (28, 4, 128),
    "Llama-3-8B": (32, 8, 128),
}


def test_named_shapes_match_their_configs():
    assert sorted(shapes.named_shapes()) == sorted(KNOWN)
    for name, numbers in KNOWN.items():
        s = shapes.load_named(name)
        assert (s.num_layers, s.num_kv_heads, s.head_dim) == numbers
        assert s.source.startswith("https://huggingface.co/")
        assert s.image_tokens.get("rule")
    assert shapes.load_named("llava-1.5-7b").image_tokens["max"] == 576
    assert shapes.load_named("qwen2_5_vl_7b").name == "Qwen2.5-VL-7B"
    assert shapes.load_named("Qwen2.5-VL-7B").kv_bytes_per_token(2) == 56 * 1024  # 2 x 28 x 4 x 128 x 2 B


def test_named_shapes_ship_as_package_data():
    found = re.search(r"^mixkv = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    config = json.loads(found.group(1))  # [tool.setuptools.package-data]'s globs for the mixkv package
    files = sorted((SERVING / shapes.DATA_DIR).glob("*.json"))
    assert len(files) == len(KNOWN)
    for f in files:
        rel = f.relative_to(ROOT / "src" / "mixkv").as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in config), rel


def _config(tmp_path: Path, payload: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(payload))
    return path


def test_config_json_top_level_and_sliding_window(tmp_path):
    path = _config(tmp_path, {"model_type": "qwen2_vl", "hidden_size": 3584, "num_hidden_layers": 28,
                              "num_attention_heads": 28, "num_key_value_heads": 4, "sliding_window": 32768,
                              "use_sliding_window": False})
    s = shapes.shape_from_config(path)
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.sliding_window) == (28, 4, 128, None)
    assert shapes.resolve_shape(str(tmp_path)).num_layers == 28  # a folder holding config.json


def test_config_json_language_sections(tmp_path):
    lm = {"model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
          "num_key_value_heads": 2}
    for key in ("text_config", "llm_config"):
        s = shapes.shape_from_config(_config(tmp_path, {"model_type": "vlm", key: lm, "vision_config": {"depth": 32}}))
        assert (s.num_layers, s.num_kv_heads, s.head_dim) == (36, 2, 128)
    explicit = {**lm, "head_dim": 256}
    assert shapes.shape_from_config(_config(tmp_path, {"text_config": explicit})).head_dim == 256
    no_gqa = {k: v for k, v in lm.items() if k != "num_key_value_heads"}
    assert shapes.shape_from_config(_config(tmp_path, no_gqa)).num_kv_heads == 16
    mistral_v01 = {**lm, "model_type": "mistral", "sliding_window": 4096}
    assert shapes.shape_from_config(_config(tmp_path, mistral_v01)).sliding_window == 4096


def test_config_json_with_class_defaults(tmp_path):
    """llava-hf's configs list only non-default fields: the rest are the model type's defaults."""
    llava = {"model_type": "llava", "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                                                    "vocab_size": 32064}}
    s = shapes.shape_from_config(_config(tmp_path, llava))
    assert (s.num_layers, s.num_kv_heads, s.head_dim) == KNOWN["LLaVA-1.5-7B"]
    next_ = {"model_type": "llava_next", "text_config": {"model_type": "mistral", "num_key_value_heads": 8,
                                                         "sliding_window": None}}
    s = shapes.shape_from_config(_config(tmp_path, next_))
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.sliding_window) == (*KNOWN["LLaVA-NeXT-Mistral-7B"], None)


def test_config_json_errors(tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        shapes.shape_from_config(_config(tmp_path, {"hidden_size": 64}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        shapes.shape_from_config(bad)
    with pytest.raises(FileNotFoundError):
        shapes.shape_from_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="Qwen2.5-VL-7B"):  # the message names the accepted shapes
        shapes.resolve_shape("qwen-9000")
    with pytest.raises(ValueError, match="num_layers"):
        ModelShape("broken", num_layers=0, num_kv_heads=1, head_dim=1)


LM = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512}


@pytest.mark.parametrize("over, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_attention_heads": "8"}, "num_attention_heads must be a positive integer, got '8'"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers must be a positive integer, got 4.0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 16}, r"num_key_value_heads \(16\) exceeds num_attention_heads \(8\)"),
    ({"head_dim": True}, "head_dim must be a positive integer, got True"),
    ({"hidden_size": 4}, r"hidden_size \(4\) is smaller than num_attention_heads \(8\)"),
])
def test_config_json_bad_counts_name_the_field(tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        shapes.shape_from_config(_config(tmp_path, {**LM, **over}))


def test_config_json_unknown_model_type_is_short(tmp_path):
    message = r"model_type 'lama' is not known to transformers \(did you mean llama"
    with pytest.raises(ValueError, match=message) as info:
        shapes.shape_from_config(_config(tmp_path, {"model_type": "lama", "hidden_size": 64}))
    assert len(str(info.value)) < 400
    with pytest.raises(ValueError, match="no close match"):
        shapes.shape_from_config(_config(tmp_path, {"text_config": {"model_type": "zzzzzz"}}))


# ---- argument errors of the pure functions ----------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: Workload(prompt_tokens=0), "prompt_tokens"),
    (lambda: Workload(prompt_tokens=10, output_tokens=-1), "output_tokens"),
    (lambda: Workload(prompt_tokens=10, decode_budget=32), "must exceed the window"),
    (lambda: Pool(0), "positive number of GiB"),
    (lambda: Pool(1e300), r"at most 1073741824 \(1 EiB\)"),
    (lambda: Pool(1, "int4"), "accepted: bf16"),
    (lambda: Pool(1, block_size=0), "block_size"),
    (lambda: plan_row(TINY, WORK, tiny_pool(), "snapkv", 4), "must exceed the window"),
    (lambda: plan(TINY, WORK, tiny_pool(), ["adakv"], [20], max_head_ratio=0.5), ">= 1"),
    (lambda: plan(TINY, WORK, tiny_pool(), ["snapkv"], []), "at least one budget"),
])
def test_bad_inputs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_pool_too_small_for_one_full_request():
    p = plan(TINY, WORK, Pool(1000 / capacity.GIB, "fp16", BLOCK), ["snapkv"], [20])
    assert p.full.transformers.requests == 0 and p.factor(p.rows[1], "transformers") is None
    json.dumps(p.to_dict())  # still serialisable
    assert "| full" in cli_capacity.format_plan(p)


# ---- the command ------------------------------------------------------------------------------------

EXAMPLE = ["capacity", "--model", "Qwen2.5-VL-7B", "--pool-gib", "40", "--prompt-tokens", "4096",
           "--output-tokens", "256", "--budgets", "64,128,256", "--methods", "snapkv,snapkv+mixkv,pyramidkv,adakv"]


def test_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "capacity.json"
    assert main([*EXAMPLE, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| method" in text and "| snapkv+mixkv |" in text and "packed densely" in text
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [r["method"] for r in rows[:2]] == ["full", "snapkv"] and len(rows) == 1 + 4 * 3
    full = rows[0]
    # 4352 tokens x 56 KiB; 40 GiB holds 172 of them
    assert full["transformers"]["bytes_per_request"] == 4352 * 56 * 1024
    assert full["transformers"]["requests"] == 172 == math.floor(40 * 2**30 / (4352 * 56 * 1024))
    snap128 = next(r for r in rows if r["method"] == "snapkv" and r["budget"] == 128)
    assert snap128["transformers"]["bytes_per_request"] == 384 * 56 * 1024
    assert snap128["paged"]["x_full_requests"] == pytest.approx(1940 / 172)
    assert payload["shape"]["name"] == "Qwen2.5-VL-7B" and payload["pool"]["block_size"] == 16


def test_command_image_and_text_tokens(capsys):
    argv = ["capacity", "--model", "LLaVA-1.5-7B", "--pool-gib", "20", "--image-tokens", "576", "--text-tokens",
            "100", "--methods", "snapkv", "--budgets", "128", "--output-tokens", "0"]
    assert main(argv) == 0
    assert "prompt 676 tokens" in capsys.readouterr().out


def test_command_reads_a_config_json(tmp_path, capsys):
    path = _config(tmp_path, {"text_config": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                                              "num_key_value_heads": 4}})
    assert main(["capacity", "--model", str(path), "--pool-gib", "40", "--prompt-tokens", "4096",
                 "--methods", "snapkv", "--budgets", "128"]) == 0
    text = capsys.readouterr().out
    assert "28 layers x 4 KV heads x head dim 128" in text
    assert re.search(r"\| full +\| - +\| +4096 \| +238\.0 \| +1\.0x \| +172 \|", text)


def test_command_lists_models(capsys):
    assert main(["capacity", "--list-models"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in KNOWN) and "576" in text


@pytest.mark.parametrize("argv, message", [
    (["capacity", "--pool-gib", "40", "--prompt-tokens", "10"], "give --model"),
    (["capacity", "--model", "Qwen2.5-VL-7B", "--prompt-tokens", "10"], "give --pool-gib"),
    (["capacity", "--model", "gpt-5", "--pool-gib", "40", "--prompt-tokens", "10"], "unknown model shape"),
    ([*EXAMPLE, "--budgets", "16,64"], "--budgets 16 must exceed the window"),
    ([*EXAMPLE, "--methods", "snapkv,h2o"], "unknown method 'h2o'; accepted: full"),
    ([*EXAMPLE, "--image-tokens", "576"], "not both"),
    (["capacity", "--model", "Qwen2.5-VL-7B", "--pool-gib", "40"], "give the prompt length"),
    (["capacity", "--model", "Qwen2.5-VL-7B", "--pool-gib", "40", "--image-tokens", "0"], "at least one token"),
    ([*EXAMPLE, "--decode-budget", "32"], "--decode-budget (32) must exceed the window"),
    ([*EXAMPLE, "--max-head-ratio", "0.5"], "--max-head-ratio"),
    ([*EXAMPLE, "--json", "/proc/mixkv-no-such-dir/out.json"], "cannot write"),
])
def test_command_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--pool-gib", "-1"], ["--dtype", "int4"], ["--block-size", "0"]])
def test_command_rejects_bad_values_while_parsing(capsys, extra):
    with pytest.raises(SystemExit) as info:
        main([*EXAMPLE, *extra])
    assert info.value.code == 2


def test_command_rejects_an_absurd_pool(capsys):
    with pytest.raises(SystemExit) as info:
        main([*EXAMPLE, "--pool-gib", "1e300"])
    assert info.value.code == 2
    assert "--pool-gib: expected at most 1073741824 GiB (1 EiB), got '1e300'" in capsys.readouterr().err


def test_command_bad_config_is_an_error_not_a_traceback(tmp_path, capsys):
    path = _config(tmp_path, {**LM, "num_attention_heads": 0})
    assert main(["capacity", "--model", str(path), "--pool-gib", "40", "--prompt-tokens", "100"]) == 2
    assert "num_attention_heads must be a positive integer, got 0" in capsys.readouterr().err


# ---- the serving layer stays pure ---------------------------------------------------------------

def test_serving_imports_only_the_core_and_no_torch():
    for path in sorted(SERVING.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"torch", "numpy"}, (path.name, name)
                assert not name.startswith(("..lab", "..cli", "..testbeds", "mixkv.lab", "mixkv.cli",
                                            "mixkv.testbeds")), (path.name, name)
