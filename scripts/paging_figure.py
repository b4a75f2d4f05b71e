"""Draw docs/paging.png: how mixkv's vLLM plugin pages a per-head method's kept tokens (#27).

An illustration on a tiny shape (3 layers x 2 KV heads, blocks of 4 tokens) with the per-head counts of an
AdaKV-like allocation (budget 6 per head on average). Left: every head padded to the largest (what one
length per request forces). Right: the plugin's dense packing (``integrations/vllm/paging.py``): the kept
tokens of all (layer, head) in order, ``L * H`` tiles per block, then the decoded tokens in vLLM's own layout.
Run with the main venv: ``python scripts/paging_figure.py``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path = ROOT / "docs" / "paging.png") -> Path:
    from matplotlib.patches import Rectangle

    from mixkv.lab.figures import pyplot, save_figure

    layers, heads, bs, outputs = 3, 2, 4, 3
    counts = [[9, 3], [5, 7], [2, 10]]  # 36 tokens = 6 per head on average
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))

    # left: padded, every (layer, head) sized for the largest head, outputs after it
    biggest = max(max(c) for c in counts)
    blocks_padded = math.ceil((biggest + outputs) / bs)
    for layer in range(layers):
        for head in range(heads):
            row = layer * heads + head
            for t in range(blocks_padded * bs):
                kind = "kept" if t < counts[layer][head] else ("out" if biggest <= t < biggest + outputs else "pad")
                colour = {"kept": colours[row], "out": "lightgrey", "pad": "white"}[kind]
                left.add_patch(Rectangle((t, -row), 1, 0.9, facecolor=colour, edgecolor="black", lw=0.3))
    for b in range(blocks_padded + 1):
        left.axvline(b * bs, color="black", lw=1.5)
    left.set_xlim(0, blocks_padded * bs)
    left.set_ylim(-layers * heads + 0.9, 1)
    left.set_yticks([-r + 0.45 for r in range(layers * heads)],
                    [f"layer {r // heads}, head {r % heads}" for r in range(layers * heads)])
    left.set_xticks([b * bs + bs / 2 for b in range(blocks_padded)], [f"block {b}" for b in range(blocks_padded)])
    left.set_title(f"padded to the largest head: {blocks_padded} blocks per request", fontsize=10)

    # right: packed; tile q = block q // (L H), layer plane (q // H) % L, head plane q % H
    total = sum(sum(c) for c in counts)
    per_block = layers * heads * bs
    prompt_blocks = math.ceil(total / per_block)
    owner = [r for r, n in enumerate([c for cs in counts for c in cs]) for _ in range(n)]
    for k in range(prompt_blocks * per_block):
        tile, offset = divmod(k, bs)
        block, plane = divmod(tile, layers * heads)
        x = block * bs + offset
        colour = colours[owner[k]] if k < total else "white"
        right.add_patch(Rectangle((x, -plane), 1, 0.9, facecolor=colour, edgecolor="black", lw=0.3))
    for plane in range(layers * heads):
        for t in range(outputs):
            right.add_patch(Rectangle((prompt_blocks * bs + t, -plane), 1, 0.9, facecolor="lightgrey",
                                      edgecolor="black", lw=0.3))
    blocks_packed = prompt_blocks + math.ceil(outputs / bs)
    for b in range(blocks_packed + 1):
        right.axvline(b * bs, color="black", lw=1.5)
    right.set_xlim(0, blocks_packed * bs)
    right.set_ylim(-layers * heads + 0.9, 1)
    right.set_yticks([-r + 0.45 for r in range(layers * heads)],
                     [f"plane: layer {r // heads}, head {r % heads}" for r in range(layers * heads)])
    right.set_xticks([b * bs + bs / 2 for b in range(blocks_packed)], [f"block {b}" for b in range(blocks_packed)])
    right.set_title(f"mixkv's plugin, packed: {prompt_blocks} prompt blocks + {blocks_packed - prompt_blocks} for "
                    f"outputs = {blocks_packed}", fontsize=10)
    handles = [Rectangle((0, 0), 1, 1, facecolor=colours[r]) for r in range(layers * heads)]
    handles.append(Rectangle((0, 0), 1, 1, facecolor="lightgrey"))
    labels = [f"kept by layer {r // heads}, head {r % heads} ({counts[r // heads][r % heads]})"
              for r in range(layers * heads)] + ["decoded tokens (vLLM's layout)"]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("One request's blocks, 3 layers x 2 KV heads, 4 tokens per block: per-head counts of a "
                 "6-per-head budget", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    return save_figure(fig, out, tight=False, dpi=110)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "paging.png"))
