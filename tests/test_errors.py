"""Bad input gets a clear error; a press never leaves anything behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv import AdaKV, MixKV, Profile, PyramidKV, SnapKV, SparseMM, press  # noqa: E402
from mixkv.core import defaults  # noqa: E402
from mixkv.core.versions import check_versions  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _mixkv_registered():
    return [k for k in AttentionInterface._global_mapping if k.startswith("mixkv")] + [
        k for k in AttentionMaskInterface._global_mapping if k.startswith("mixkv")
    ]


@pytest.mark.parametrize("cls", [SnapKV, PyramidKV, AdaKV])
def test_budget_not_larger_than_window(cls):
    with pytest.raises(ValueError, match=r"budget \(32\) must be larger than the window \(32\)"):
        cls(budget=32, window=32)
    with pytest.raises(ValueError, match="larger than the window"):
        cls(budget=8, window=32)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5])
def test_ratio_must_be_a_fraction(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a fraction of the prompt in \(0, 1\]"):
        SnapKV(ratio=ratio)


@pytest.mark.parametrize("cls", [SnapKV, PyramidKV, AdaKV])
def test_budget_and_ratio_together_are_refused(cls):
    with pytest.raises(ValueError, match=r"give budget= .* or ratio= .*not both; got budget=40, ratio=0.5"):
        cls(budget=40, ratio=0.5)


def test_budget_and_ratio_by_name_are_refused(llama):
    with pytest.raises(ValueError, match="not both"):
        mixkv.make_method("snapkv+mixkv", budget=40, ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        with press(llama, "snapkv", budget=40, ratio=0.5):
            pass
    assert _hook_count(llama) == 0


def test_budget_default_only_without_ratio():
    assert SnapKV().budget == defaults.BUDGET and mixkv.make_method("adakv").budget == defaults.BUDGET
    by_ratio = mixkv.make_method("snapkv+mixkv", ratio=0.5)
    assert (by_ratio.budget, by_ratio.ratio) == (None, 0.5)
    assert SnapKV(ratio=0.5).with_budget(40).budget == 40


def test_non_int_budget():
    with pytest.raises(ValueError, match="budget must be an int"):
        SnapKV(budget=64.5)


def test_unknown_method_lists_accepted_names():
    with pytest.raises(ValueError, match=r"unknown method 'snapkvv'; accepted: full, snapkv, pyramidkv"):
        mixkv.make_method("snapkvv")
    with pytest.raises(ValueError, match="accepted"):
        mixkv.make_method("snapkv+foo")


def test_unsupported_model_names_supported_ones():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=r"unsupported model BertModel \(model_type='bert'\).*Qwen2-VL.*Llama"):
        with press(bert, "snapkv"):
            pass
    assert _hook_count(bert) == 0


def test_profile_shape_mismatch_is_an_error(llama, tmp_path):
    wrong = Profile(model="other", num_layers=5, num_kv_heads=2, key_redundancy=torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"profile for 'other' has 5 layers x 2 KV heads, but the model .* has 2 x 2"):
        with press(llama, MixKV(SnapKV(budget=16, window=4), redundancy=wrong)):
            pass
    path = tmp_path / "p.json"
    mixkv.save_profile(Profile(model="x", num_layers=2, num_kv_heads=3, head_scores=torch.rand(2, 3)), path)
    with pytest.raises(ValueError, match="2 layers x 3 KV heads"):
        with press(llama, SparseMM(budget=16, window=4, head_scores=path)):
            pass
    assert _hook_count(llama) == 0 and not _mixkv_registered()


def test_profile_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mixkv.load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a mixkv profile"):
        mixkv.load_profile(bad)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected"):
        Profile(model="m", num_layers=2, num_kv_heads=2, key_redundancy=[0.1, 0.2, 0.3])


def test_sparsemm_without_profile_is_an_error():
    with pytest.raises(ValueError, match="SparseMM needs head_scores"):
        SparseMM(budget=64)
    with pytest.raises(ValueError, match="SparseMM needs head_scores"):
        mixkv.make_method("sparsemm+mixkv", budget=64)


def test_method_kwargs_only_with_names():
    with pytest.raises(ValueError, match="only apply to a method given by name"):
        with press(make_model("llama"), SnapKV(budget=16, window=4), budget=8):
            pass


def test_press_restores_model_when_generation_raises(llama):
    inputs = make_inputs(llama, "llama")
    ref = llama.generate(**inputs, max_new_tokens=4, do_sample=False)
    hooks_before = _hook_count(llama)
    impl_before = llama.config._attn_implementation
    boom = llama.model.layers[1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"), press(llama, "adakv+mixkv", budget=16, window=4):
            llama.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        boom.remove()
    assert _hook_count(llama) == hooks_before
    assert llama.config._attn_implementation == impl_before
    assert not _mixkv_registered()
    assert torch.equal(llama.generate(**inputs, max_new_tokens=4, do_sample=False), ref)


def test_compressed_cache_cannot_be_extended_outside_its_press(llama):
    inputs = make_inputs(llama, "llama")
    with press(llama, "snapkv", budget=16, window=4):
        out = llama(**inputs, use_cache=True)
    with pytest.raises(RuntimeError, match="only be extended inside that press"):
        llama(input_ids=torch.tensor([[3]]), cache=out.cache, use_cache=True)


def test_static_cache_is_rejected(llama):
    inputs = make_inputs(llama, "llama")
    with pytest.raises(ValueError, match="DynamicCache"), press(llama, "snapkv", budget=16, window=4):
        llama.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_full_is_a_no_op(llama):
    inputs = make_inputs(llama, "llama")
    ref = llama.generate(**inputs, max_new_tokens=4, do_sample=False)
    with press(llama, "full") as session:
        assert session is None
        assert torch.equal(llama.generate(**inputs, max_new_tokens=4, do_sample=False), ref)


def test_transformers_version_check():
    with pytest.raises(ImportError, match=r"needs transformers 5.x"):
        check_versions("4.57.1")
    with pytest.warns(UserWarning, match="tested with transformers up to 5.25"):
        check_versions("5.30.0")
    assert check_versions("5.25.0") == (5, 25)


def test_ci_installs_within_the_tested_range():
    """constraints.txt (what `make setup` and CI install) and TESTED_MAX say the same release, and the
    transformers these tests run on is inside it: the tested range is what CI ran."""
    import re

    import transformers

    from mixkv.core.versions import TESTED_MAX, _parse

    text = (Path(__file__).parents[1] / "constraints.txt").read_text()
    bound = re.search(r"^transformers>=[\d.]+,<(\d+)\.(\d+)$", text, re.M)
    assert bound and (int(bound[1]), int(bound[2]) - 1) == TESTED_MAX
    assert _parse(transformers.__version__) <= TESTED_MAX
