"""MixKV with diversity inside each modality (``+mixkv-modal``): the maths by hand, the paper's score on
text, a different choice on images, and a clear refusal where the modality is unknown (vLLM)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import reference as ref  # noqa: E402

from mixkv.core import scores  # noqa: E402
from mixkv.core.layer import LayerPrefill  # noqa: E402
from mixkv.core.methods import MixKV, MixKVModality, SnapKV  # noqa: E402
from mixkv.core.registry import make_method  # noqa: E402
from mixkv.core.selection import plan_keep  # noqa: E402


def test_hand_checked_two_groups():
    """Image keys (1,0), (1,0), (0,1); text keys (0,1), (0.6,0.8) and a window token (0,1). Inside its own
    modality the odd image key (0,1) is the diverse one, and so is (0.6,0.8) among the text."""
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]])[None, None]
    groups = torch.tensor([[True, True, True, False, False, False]])
    target = torch.full((1, 1, 1), 0.5)
    got = scores.diversity_within_groups(scores.unit(k), groups, window=1, target_mean=target)
    # image centroid (2/3, 1/3): dots 2/3, 2/3, 1/3 -> min-max of -dot: 0, 0, 1
    # text centroid (0.2, 14/15): dots 14/15, 13/15 -> 0, 1; then rescaled so the mean is 0.5
    want = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]) * 0.5 / 0.4
    torch.testing.assert_close(got[0, 0], want, rtol=1e-4, atol=1e-5)
    # against one centroid of all six (0.43, 0.63) the tilted text key is the *least* diverse token:
    # the paper's score ranks a token by how far it is from the mixture, not from its own kind
    paper = scores.diversity_from(scores.unit(k), scores.key_centroid(k), 1, target)
    assert float(paper[0, 0, 4]) == 0.0 and float(got[0, 0, 4]) == pytest.approx(float(got[0, 0].max()), rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), pads=st.sampled_from([None, [0, 9]]))
def test_one_group_is_the_papers_diversity(seed, pads):
    _, k, _, valid = ref.make_inputs(seed, 2, 2, 2, 4, 30, 8, pads)
    target = torch.rand(2, 2, 1, generator=torch.Generator().manual_seed(seed)) / 30
    k_hat = scores.unit(k)
    want = scores.diversity_from(k_hat, scores.centroid_of(k_hat, valid), 4, target, valid)
    for groups in (torch.zeros(2, 30, dtype=torch.bool), torch.ones(2, 30, dtype=torch.bool)):
        got = scores.diversity_within_groups(k_hat, groups, 4, target, valid)
        real = torch.ones(2, 1, 26, dtype=torch.bool) if valid is None else valid[:, None, :26]
        torch.testing.assert_close(got.masked_fill(~real, 0), want.masked_fill(~real, 0), rtol=1e-5, atol=1e-7)


def _layer(image_mask=None, seed=0):
    q, k, v, _ = ref.make_inputs(seed, 1, 2, 2, 8, 64, 16, None)
    return LayerPrefill(layer_idx=0, num_layers=1, queries=q, keys=k, values=v, scaling=0.25, window=8,
                        image_mask=image_mask)


def test_text_prompt_keeps_what_mixkv_keeps():
    paper, modal = MixKV(SnapKV(budget=24, window=8)), MixKVModality(SnapKV(budget=24, window=8))
    a, b = plan_keep(paper, _layer()), plan_keep(modal, _layer())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.lengths, b.lengths)


def test_image_prompt_scores_within_modalities():
    image = torch.zeros(1, 64, dtype=torch.bool)
    image[0, 5:45] = True
    layer = _layer(image)
    modal = MixKVModality(SnapKV(budget=24, window=8))
    s_imp = layer.s_ext + scores.intrinsic_importance(layer.values, 8, layer.s_ext_mean, layer.cand_valid)
    s_div = scores.diversity_within_groups(layer.k_hat, image, 8, layer.s_ext_mean)
    want = scores.mix(s_imp, s_div, layer.key_redundancy)
    torch.testing.assert_close(modal.score(layer), want)
    assert not torch.allclose(modal.score(layer), MixKV(SnapKV(budget=24, window=8)).score(_layer(image)))
    # budgets and allocation are the base's
    assert plan_keep(modal, layer).lengths.tolist() == [[24, 24]]


def test_names_and_errors():
    m = make_method("adakv+mixkv-modal", budget=64)
    assert isinstance(m, MixKVModality) and m.name == "adakv+mixkv-modal" and "diversity=modality" in m.describe()
    assert m.reads_modality and not MixKV.reads_modality
    with pytest.raises(ValueError, match="diversity must be 'prompt' or 'modality'"):
        MixKV(SnapKV(budget=64), diversity="image")


def test_vllm_refuses_the_modality_option():
    from mixkv.integrations.vllm.config import accepted_methods, why_not_served

    assert "image tokens" in why_not_served("snapkv+mixkv-modal")
    assert "snapkv+mixkv-modal" not in accepted_methods() and "snapkv+mixkv" in accepted_methods()


def test_image_batch_rows_decode_as_alone():
    """A left-padded batch of image prompts under +mixkv-modal: every row's decode logits equal the row alone
    (the image mask, the group centroids and the min-max never mix rows or count padding)."""
    from zoo import make_inputs, make_model, select_row

    import mixkv

    model = make_model("llava")
    inputs = make_inputs(model, "llava", batch=2, text_len=40, left_pad=[0, 6], seed=2)
    method = mixkv.make_method("snapkv+mixkv-modal", budget=20, window=4)

    def decode(inp):
        with torch.no_grad(), mixkv.press(model, method, record=True) as session:
            out = model.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return torch.stack(out.logits, 1).double(), session

    batch, session = decode(inputs)
    assert session.image_mask is not None and bool(session.image_mask.any())
    for row in range(2):
        one, _ = decode(select_row(inputs, "llava", row))
        assert (batch[row] - one[0]).abs().max().item() <= 5e-4
    # and the option changed what was kept on this image prompt (else the test would prove nothing)
    with torch.no_grad(), mixkv.press(model, mixkv.make_method("snapkv+mixkv", budget=20, window=4),
                                      record=True) as paper:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert any(not torch.equal(paper.plans[i].indices, session.plans[i].indices) for i in session.plans)
