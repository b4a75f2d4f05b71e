"""Regions of a text prompt for the SnapKV analysis (``mixkv.lab.regions``), hand-checked."""

import pytest
import torch

from mixkv.lab.regions import REGIONS, kept_per_region, mass_per_token, region_masks, text_region_spans

MESSAGE = "Find the code.\n\nA cat sat. The code is 4821. The other is 77. A dog ran.\n\nWhat is the code?"
TEXT = "<s>user\n" + MESSAGE + "\n<s>assistant\n"


def test_spans_split_the_prompt():
    spans = text_region_spans(TEXT, MESSAGE, ["4821"])
    part = {k: [TEXT[a:b] for a, b in v] for k, v in spans.items()}
    assert part["template"] == ["<s>user\nFind the code.\n\n"]
    assert part["answer"] == ["4821"]
    assert [s.strip() for s in part["facts"]] == ["The code is 4821.", "The other is 77."]
    assert part["question"][0].startswith("\n\nWhat is the code?")
    assert part["filler"][0].startswith("A cat sat.") and part["filler"][0].endswith("A dog ran.")


def test_masks_are_disjoint_and_mass_is_per_token():
    # one "token" per character keeps the check readable
    offsets = [(i, i + 1) for i in range(len(TEXT))]
    masks = region_masks(offsets, text_region_spans(TEXT, MESSAGE, ["4821"]))
    assert list(masks) == list(REGIONS)
    total = torch.stack(list(masks.values())).sum(0)
    assert int(total.max()) == 1 and int(masks["answer"].sum()) == 4
    # all attention on the four answer characters: 1/4 per answer token, 0 elsewhere
    att = torch.zeros(2, len(TEXT))
    att[:, masks["answer"]] = 0.25
    got = mass_per_token(att, masks)
    assert got["answer"].tolist() == [0.25, 0.25] and got["filler"].tolist() == [0.0, 0.0]
    share = masks["answer"].float()
    kept = kept_per_region(share, masks)
    assert kept["answer"] == {"kept": 1.0, "budget": 1.0} and kept["filler"]["kept"] == 0.0


def test_missing_answer_is_empty_region():
    spans = text_region_spans(TEXT, MESSAGE, ["9999"])
    assert spans["answer"] == []
    with pytest.raises(ValueError):
        text_region_spans(TEXT, "not in the text", ["4821"])
