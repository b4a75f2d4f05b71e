"""The pure helpers of scripts/vllm_vlm_check.py (``mixkv.integrations.vllm.checks``); no vLLM needed."""

from __future__ import annotations

import base64
import io
import math

import pytest
import torch
from PIL import Image

from mixkv.integrations.vllm import checks


def test_until_eos_and_first_difference():
    assert checks.until_eos([5, 6, 2, 7], {2}) == [5, 6, 2]
    assert checks.until_eos([5, 6], {2}) == [5, 6]
    assert checks.until_eos((), [2]) == []
    assert checks.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert checks.first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert checks.first_difference([1, 2], [1, 2, 3]) == 2
    assert checks.first_difference([], [4]) == 0


def test_kept_agreement_counts_shared_positions_per_layer_and_head():
    a = torch.tensor([[[0, 1, 2, 3], [0, 4, 5, 6]]])  # (L=1, H=2, B=4)
    assert checks.kept_agreement([a], [a.clone()]) == 1.0
    b = torch.tensor([[[0, 1, 2, 9], [0, 4, 5, 6]]])
    assert checks.kept_agreement([a], [b]) == 7 / 8
    swapped = a[:, [1, 0]]  # the same positions in the other head do not count
    assert checks.kept_agreement([a], [swapped]) == 2 / 8
    assert checks.kept_agreement([a, a], [b, a]) == 15 / 16
    assert math.isnan(checks.kept_agreement([], []))
    with pytest.raises(ValueError, match="different layouts"):
        checks.kept_agreement([a], [a[:, :1]])


def test_agreement_by_task():
    rows = [{"task": "colour", "reply_a": "x", "reply_b": "x", "score_a": 1.0, "score_b": 1.0},
            {"task": "colour", "reply_a": "y", "reply_b": "z", "score_a": 0.0, "score_b": 1.0},
            {"task": "count", "reply_a": "3", "reply_b": "3", "score_a": 1.0, "score_b": 1.0}]
    out = checks.agreement_by_task(rows)
    assert out["colour"] == {"n": 2, "exact_match": 1, "exact_match_pct": 50.0, "score_a": 0.5, "score_b": 1.0}
    assert out["count"]["exact_match_pct"] == 100.0
    assert out["all"]["n"] == 3 and out["all"]["exact_match"] == 2
    assert checks.agreement_by_task([]) == {}


def test_chat_request_sends_images_as_lossless_png_data_urls():
    image = Image.new("RGB", (8, 4), (10, 200, 30))
    image.putpixel((3, 2), (1, 2, 3))
    body = checks.chat_request("m", "What colour?", [image, "data:image/png;base64,AAAA"], 7, request_id="r1")
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["request_id"] == "r1"
    content = body["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
    assert content[-1]["text"] == "What colour?"
    assert content[1]["image_url"]["url"] == "data:image/png;base64,AAAA"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.format == "PNG" and back.convert("RGB").tobytes() == image.tobytes()
    assert checks.chat_request("m", "Hi")["messages"][0]["content"] == "Hi"  # no images: plain text content


def test_kept_differences_name_the_swapped_tokens_and_their_score_gap():
    ours = torch.tensor([[[0, 2, 5, 6], [1, 2, 5, 6]]])  # (L=1, H=2, B=4); positions 5, 6: the window
    theirs = torch.tensor([[[0, 3, 5, 6], [1, 2, 5, 6]]])
    scores = [torch.tensor([[9.0, 1.0, 4.0000001, 4.0, 0.5], [5.0, 6.0, 7.0, 1.0, 2.0]])]  # (H, C)
    diffs = checks.kept_differences(scores, ours, theirs)
    assert len(diffs) == 1
    d = diffs[0]
    assert (d["layer"], d["head"], d["only_ours"], d["only_theirs"]) == (0, 0, [2], [3])
    assert d["relative_gap"] < 1e-6
    far = checks.kept_differences([torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.5], [0.0] * 5])], ours, theirs)
    assert far[0]["relative_gap"] == pytest.approx(0.75)
    assert checks.kept_differences(scores, ours, ours) == []
    window = checks.kept_differences(scores, torch.tensor([[[0, 2, 3, 6], [1, 2, 5, 6]]]), theirs)
    assert window[0]["only_theirs"] == [5] and window[0]["relative_gap"] == float("inf")  # no score: no near-tie


def test_grid_step_and_boundary_distance_follow_the_rank_grid():
    from mixkv.core.scores import rank_grid

    for x in (0.0008991958457045257, 3.25, -7.1, 1e-9):
        mantissa, exponent = math.frexp(x)
        rounded = float(rank_grid(torch.tensor([x], dtype=torch.float64))[0])
        assert rounded == math.ldexp(checks.grid_step(x) / 2**12, exponent)
    assert checks.grid_step(0.0) is None and checks.grid_step(float("nan")) is None
    on_boundary = math.ldexp((3000 + 0.5) / 2**12, -3)
    assert checks.boundary_distance(on_boundary) == 0.0
    mid = math.ldexp(3000 / 2**12, -3)  # a grid point: half a step from either boundary
    assert checks.boundary_distance(mid) == pytest.approx(0.5 / 3000)


def test_a_swap_is_a_near_tie_only_on_adjacent_steps_next_to_a_boundary():
    near = {"grid_steps_ours": [3771], "grid_steps_theirs": [3772], "boundary_distance": 1.9e-7}
    assert checks.is_near_tie(near)
    assert not checks.is_near_tie({**near, "boundary_distance": 1e-3})  # far from a boundary: a real choice
    assert not checks.is_near_tie({**near, "grid_steps_theirs": [3790]})  # not neighbours on the grid
    assert not checks.is_near_tie({**near, "grid_steps_theirs": []})
    assert not checks.is_near_tie({**near, "grid_steps_ours": [None]})
    scores = [torch.tensor([[0.0008990536443889141, 0.0008991958457045257, 0.1]])]  # (H=1, C=3)
    d = checks.kept_differences(scores, torch.tensor([[[0, 2, 3]]]), torch.tensor([[[1, 2, 3]]]))[0]
    assert (d["grid_steps_ours"], d["grid_steps_theirs"]) == ([3771], [3772])
    assert d["boundary_distance"] < 1e-6 and checks.is_near_tie(d)
