"""The PNG helpers used by the text demo and the benchmark write readable figures."""

from __future__ import annotations

import torch
from PIL import Image

from mixkv.core.selection import KeepPlan
from mixkv.lab.figures import kept_share_per_layer, plot_bench, plot_kept_positions


def test_kept_share_per_layer_counts_heads():
    plan = KeepPlan(torch.tensor([[[0, 3, 5], [1, 2, 5]]]), torch.tensor([[3, 2]]))
    share = kept_share_per_layer({0: plan}, 2, 6)
    assert share[0].tolist() == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5]
    assert share[1].tolist() == [1.0] * 6  # layer 1 was not compressed


def test_plot_kept_positions_and_bench(tmp_path):
    plan = KeepPlan(torch.tensor([[[0, 3, 5], [1, 2, 5]]]), torch.tensor([[3, 3]]))
    path = plot_kept_positions({"snapkv": {0: plan}, "snapkv+mixkv": {0: plan}}, 6, tmp_path / "k.png",
                               marks=[3], title="kept")
    with Image.open(path) as im:
        assert im.size == (1210, 473)
    rows = [{"context": c, "method": m, "decode_ms_per_token": 10.0 + c / 100, "kv_bytes": c * 1000}
            for c in (1024, 2048) for m in ("full", "snapkv+mixkv")]
    with Image.open(plot_bench(rows, tmp_path / "b.png", title="bench")) as im:
        assert im.size == (1210, 462)
