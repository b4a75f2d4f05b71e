"""Shipped models bring their calibration profile (issue #28, part 4): `mixkv eval --model toy-vlm-24
--methods sparsemm` needs no --profile; a user's profile still wins; another model's shape is refused."""

from __future__ import annotations

import pytest
import torch

import mixkv
from mixkv.cli.eval_cmd import shipped_profile_for
from mixkv.core.profiles import Profile, load_profile
from mixkv.core.registry import needs_profile
from mixkv.lab.evaluation import EvalConfig
from mixkv.testbeds import sources


@pytest.mark.parametrize("model", ["smollm2-135m", "toy-vlm", "toy-vlm-24"])
def test_every_shipped_model_has_a_profile_of_its_own(model):
    path = sources.shipped_profile(model)
    assert path is not None and path.is_file()
    profile = load_profile(path)
    assert profile.model == model and profile.head_scores is not None and profile.retrieval_scores is not None


def test_other_models_have_no_shipped_profile(tmp_path):
    assert sources.shipped_profile("org/some-model") is None
    assert sources.shipped_profile(str(tmp_path)) is None


@pytest.mark.parametrize("methods,redundancy,wanted", [
    (["sparsemm"], "online", True), (["headkv+mixkv"], "online", True), (["snapkv+mixkv"], "profile", True),
    (["snapkv", "adakv+mixkv"], "online", False), (["full"], "profile", False)])
def test_the_shipped_profile_is_used_only_when_a_method_needs_one(methods, redundancy, wanted, capsys):
    config = EvalConfig(methods=methods, budgets=[64], redundancy=redundancy)
    got = shipped_profile_for(config, "toy-vlm-24")
    assert (got == str(sources.shipped_profile("toy-vlm-24"))) == wanted
    assert ("shipped for toy-vlm-24" in capsys.readouterr().out) == wanted
    if wanted:
        config.profile = got
        config.validate()  # the grid builds with it


def test_needs_profile_reads_the_declared_trait():
    assert needs_profile("sparsemm") and needs_profile("headkv")
    assert not needs_profile("pyramidkv+mixkv") and needs_profile("pyramidkv+mixkv", "profile")
    assert not needs_profile("full", "profile")


def test_a_profile_of_another_models_shape_is_refused(toy_vlm_24):
    model, _ = toy_vlm_24
    wrong = Profile("other", 2, 3, head_scores=[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="layers|shape|heads"), mixkv.press(model, "sparsemm", budget=64,
                                                                            profile=wrong):
        pass
    shipped = load_profile(sources.shipped_profile("toy-vlm-24"))
    with torch.no_grad(), mixkv.press(model, "sparsemm", budget=64, profile=shipped) as session:
        assert session is not None
