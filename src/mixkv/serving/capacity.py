"""How many requests fit in a KV pool, full cache vs each method, in two memory layouts.

Freed KV is worth something only when a server turns it into more requests at once. For one
request (prompt ``N`` tokens, ``O`` output tokens) and a method at budget ``B`` (tokens kept per
KV head, window ``W`` included), the planner counts the tokens each head holds at its peak and
turns them into bytes and concurrent requests for:

* **transformers**, mixkv's own cache: exactly the kept tokens, packed without padding. Uniform
  methods keep ``B`` per head; head-adaptive ones keep ``B`` per head *on average* (their totals
  are exact), so the same bytes; PyramidKV keeps its per-layer schedule.
* **paged serving** as mixkv's vLLM plugin lays it out: a block holds ``block_size`` token slots of one
  layer for every KV head, one block table per request serves all layers. Uniform methods keep their
  ``B`` tokens in place (``ceil((B + O) / block_size)`` blocks). Per-layer and per-head methods pack every
  head's kept prompt tokens densely into whole blocks (a block holds ``L * H`` tiles of ``block_size``
  tokens, one per layer and head: ``ceil(sum of kept / (L H block_size))`` blocks) and their outputs in
  blocks after those (``ceil(O / block_size)``); see ``integrations/vllm/paging.py``. The request also
  holds its whole prompt until the compression after prefill; ``prefilling`` requests at a time pay that
  peak. ``max_head_ratio`` (measured largest head / budget) adds a note: what padding every head to the
  largest would fit instead, the engine without per-head paging.

docs/serving.md gives the formulas and what a paged engine needs for each kind of budget. Pure
functions over integers: no torch, no model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..core import defaults
from ..core.registry import allocation_of, available_methods
from .shapes import ModelShape

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
"""Bytes per stored key/value element (fp8: no per-token scales counted)."""

GIB = 1 << 30

MAX_POOL_GIB = 1 << 30
"""Largest KV pool accepted, 1 EiB: beyond any cluster, and byte counts stay within 64 bits."""

VLLM_BLOCK_SIZE = 16
"""vLLM's default tokens per KV block (``CacheConfig.DEFAULT_BLOCK_SIZE`` in 0.32)."""

VLLM_NULL_BLOCKS = 1
"""vLLM's block pool keeps one block aside (the null block) for padding entries of block tables."""

VLLM_MAX_NUM_SEQS = 1024
"""vLLM 0.32's default cap on requests scheduled at once on GPUs with >= 70 GiB (256 on smaller ones)."""

def budget_kind(method: str) -> str:
    """``full``, ``uniform`` (same budget for every head), ``per-layer`` or ``per-head``: the method's
    declared :class:`~mixkv.core.methods.base.Allocation` (a ``+mixkv`` wrapper keeps its base's)."""
    try:
        allocation = allocation_of(method)
    except ValueError:
        raise ValueError(f"the capacity planner does not know how {method!r} spreads its budget; "
                         f"known: {', '.join(available_methods())}") from None
    return "full" if allocation is None else allocation.value


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Workload:
    """One request: prompt and output lengths, the window, and the optional decode budget.

    ``decode_budget``: compression while decoding (``press(decode_budget=, every=)``): a layer that
    holds more than ``decode_budget`` per head and got ``decode_every`` tokens since it was last
    compressed is cut back to the method's allocation at ``decode_budget``; so a head holds at most
    ``max(kept, allocation, decode_budget) + decode_every`` (full cache rows are never compressed).
    """

    prompt_tokens: int
    output_tokens: int = 0
    window: int = defaults.WINDOW
    decode_budget: int | None = None
    decode_every: int = defaults.DECODE_EVERY
    pyramid_beta: float = defaults.PYRAMID_BETA

    def __post_init__(self) -> None:
        _positive_int("prompt_tokens", self.prompt_tokens)
        _positive_int("output_tokens", self.output_tokens, 0)
        _positive_int("window", self.window)
        _positive_int("decode_every", self.decode_every)
        if self.decode_budget is not None:
            _positive_int("decode_budget", self.decode_budget)
            if self.decode_budget <= self.window:
                raise ValueError(f"decode_budget ({self.decode_budget}) must exceed the window ({self.window}): "
                                 "like every budget it counts the window")
        if not self.pyramid_beta > 1:
            raise ValueError(f"pyramid_beta must be > 1, got {self.pyramid_beta!r}")


@dataclass(frozen=True)
class Pool:
    """The memory for KV: its size, element type, paged block size, requests prefilling at once."""

    gib: float
    dtype: str = "bf16"
    block_size: int = VLLM_BLOCK_SIZE
    prefilling: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.gib, bool) or not isinstance(self.gib, (int, float)) or not 0 < self.gib <= MAX_POOL_GIB:
            raise ValueError(f"the KV pool must be a positive number of GiB, at most {MAX_POOL_GIB} (1 EiB), "
                             f"got {self.gib!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; accepted: {', '.join(DTYPE_BYTES)}")
        _positive_int("block_size", self.block_size)
        _positive_int("prefilling", self.prefilling, 0)

    @property
    def bytes(self) -> int:
        return int(self.gib * GIB)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def pyramid_kept(prompt: int, budget: int, window: int, num_layers: int,
                 beta: float = defaults.PYRAMID_BETA) -> list[int]:
    """Prompt tokens each head of each layer keeps under PyramidKV (window included).

    The same arithmetic as :func:`mixkv.core.budgets.pyramid_counts` on plain floats (a test holds
    them equal): ``min = base / beta``, ``max = 2 base - min`` clipped to the candidates, linear in
    between, truncated; a prompt that fits its budget is kept whole.
    """
    n_cand, base = prompt - window, budget - window
    if n_cand <= base:
        return [prompt] * num_layers
    lo = base / beta
    hi = 2 * base - lo
    if hi >= n_cand:
        hi = float(n_cand)
        lo = 2 * base - hi
    if num_layers == 1:
        hi = lo = float(base)
    step = (hi - lo) / max(num_layers - 1, 1)
    return [min(max(math.floor(hi - layer * step + 1e-9), 0), n_cand) + window for layer in range(num_layers)]


def kept_per_layer(kind: str, shape: ModelShape, work: Workload, budget: int | None) -> list[int]:
    """Prompt tokens kept per KV head in each layer: the mean over heads for per-head methods
    (their allocations keep exactly ``budget`` per head on average)."""
    n, layers = work.prompt_tokens, shape.num_layers
    if kind == "full" or n <= budget:
        return [n] * layers
    if kind == "per-layer":
        return pyramid_kept(n, budget, work.window, layers, work.pyramid_beta)
    return [budget] * layers


def peak_held(kept: int, work: Workload, compressed: bool, allocation: int | None = None) -> int:
    """Tokens a head holds at its peak: kept prompt plus every output token, or, with a decode
    budget, at most ``max(kept, allocation, decode_budget) + decode_every``; ``allocation``: what the
    method gives this head at the decode budget (default: the decode budget itself)."""
    grown = kept + work.output_tokens
    if not compressed or work.decode_budget is None:
        return grown
    alloc = work.decode_budget if allocation is None else allocation
    return min(grown, max(kept, alloc, work.decode_budget) + work.decode_every)


def fit(units: int, per_request: int, prefill_peak: int, prefilling: int) -> int:
    """Requests that fit ``units`` when each holds ``per_request`` and ``prefilling`` of them are at
    ``prefill_peak`` (a compressed request holds its whole prompt until compressed)."""
    if per_request <= 0:
        raise ValueError("a request must hold at least one unit")
    worst = max(per_request, prefill_peak)
    if units < prefilling * worst:
        return units // worst
    return (units - prefilling * max(0, prefill_peak - per_request)) // per_request


@dataclass(frozen=True)
class Layout:
    """One request in one memory layout: bytes it holds and requests that fit the pool."""

    bytes_per_request: int | None
    requests: int | None
    note: str = ""


@dataclass(frozen=True)
class Row:
    """Full cache or one method at one budget: tokens per head and both layouts."""

    method: str
    budget: int | None
    kind: str
    kept_per_head: float
    """Prompt tokens kept per KV head, mean over layers and heads."""
    held_per_head: float
    """Peak tokens per KV head with the output, mean over layers and heads (transformers' bytes)."""
    transformers: Layout
    paged: Layout
    """mixkv's vLLM plugin: one block table per request for all layers; per-layer / per-head methods packed."""
    paged_per_layer: Layout
    """Design: one block table per layer (the same as ``paged`` for packed methods)."""
    padded: Layout | None = None
    """Per-head methods with ``max_head_ratio``: every head padded to the largest (no per-head paging)."""


@dataclass
class Plan:
    """Every row of one planner run, with what it was run on."""

    shape: ModelShape
    work: Workload
    pool: Pool
    max_head_ratio: float | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def full(self) -> Row:
        return self.rows[0]

    def factor(self, row: Row, layout: str) -> float | None:
        """How many times the full cache's concurrent requests ``row`` serves in ``layout``."""
        if getattr(row, layout) is None:
            return None
        mine = getattr(row, layout).requests
        full = getattr(self.full, "paged" if layout == "padded" else layout).requests
        return None if mine is None or not full else mine / full

    def compression(self, row: Row, layout: str = "transformers") -> float | None:
        """Full cache bytes per request over ``row``'s."""
        if getattr(row, layout) is None:
            return None
        mine = getattr(row, layout).bytes_per_request
        full = getattr(self.full, "paged" if layout == "padded" else layout).bytes_per_request
        return None if not mine or full is None else full / mine

    def to_dict(self) -> dict:
        results = []
        for row in self.rows:
            d = {k: v for k, v in asdict(row).items() if k not in ("transformers", "paged", "paged_per_layer",
                                                                       "padded")}
            for name in ("transformers", "paged", "paged_per_layer", "padded"):
                layout = getattr(row, name)
                if layout is None:
                    continue
                d[name] = {**asdict(layout), "x_full_requests": self.factor(row, name),
                           "compression": self.compression(row, name)}
            results.append(d)
        return {"shape": self.shape.to_dict(), "workload": asdict(self.work), "pool": asdict(self.pool),
                "pool_bytes": self.pool.bytes, "max_head_ratio": self.max_head_ratio, "results": results,
                "notes": self.notes}


def _paged(shape: ModelShape, work: Workload, pool: Pool, slots: list[int], compressed: bool) -> tuple[Layout, Layout]:
    """Both paged layouts for a request whose layer ``l`` needs ``slots[l]`` token slots per head."""
    layers, bs = shape.num_layers, pool.block_size
    page = _page(shape, pool)
    block_ids = _block_ids(shape, pool)
    prompt_blocks = math.ceil(work.prompt_tokens / bs) if compressed else 0
    per_layer = [math.ceil(s / bs) for s in slots]
    shared = max(per_layer)
    table = Layout(shared * layers * page, fit(block_ids, shared, prompt_blocks, pool.prefilling))
    own = Layout(sum(per_layer) * page,
                 fit(block_ids * layers, sum(per_layer), prompt_blocks * layers, pool.prefilling))
    return table, own


def _page(shape: ModelShape, pool: Pool) -> int:
    """Bytes of one block in one layer (all KV heads)."""
    return 2 * shape.num_kv_heads * shape.head_dim * pool.block_size * pool.dtype_bytes


def _block_ids(shape: ModelShape, pool: Pool) -> int:
    """Blocks in the pool (a block id spans every layer), less vLLM's null block."""
    return max(pool.bytes // (shape.num_layers * _page(shape, pool)) - VLLM_NULL_BLOCKS, 0)


def packed_blocks(kept: list[int], outputs: int, block_size: int) -> int:
    """Blocks a per-layer / per-head request holds in the vLLM plugin: its kept prompt tokens packed densely
    (``kept[l]``: mean per head of layer ``l``, so ``sum(kept) * H`` tokens in tiles of ``block_size`` tokens,
    ``L * H`` tiles per block), then its outputs in blocks of their own."""
    return math.ceil(sum(kept) / (len(kept) * block_size)) + math.ceil(outputs / block_size)


def _packed(shape: ModelShape, work: Workload, pool: Pool, kept: list[int], held: list[int]) -> Layout:
    blocks = packed_blocks(kept, max(h - k for h, k in zip(held, kept)), pool.block_size)
    prompt_blocks = math.ceil(work.prompt_tokens / pool.block_size)
    return Layout(blocks * shape.num_layers * _page(shape, pool),
                  fit(_block_ids(shape, pool), blocks, prompt_blocks, pool.prefilling))


def plan_row(shape: ModelShape, work: Workload, pool: Pool, method: str, budget: int | None,
             max_head_ratio: float | None = None) -> Row:
    """Tokens, bytes and concurrent requests of one method at one budget (``"full"``: no budget)."""
    kind = budget_kind(method)
    compressed = kind != "full"
    if compressed:
        _positive_int(f"{method}: budget", budget)
        if budget <= work.window:
            raise ValueError(f"budget {budget} must exceed the window ({work.window}): the budget counts the window")
    kept = kept_per_layer(kind, shape, work, budget)
    allocation = [None] * shape.num_layers
    if kind == "per-layer" and work.decode_budget is not None:  # each layer's schedule at the decode budget
        allocation = pyramid_kept(work.prompt_tokens + work.output_tokens, work.decode_budget, work.window,
                                  shape.num_layers, work.pyramid_beta)
    held = [peak_held(k, work, compressed, a) for k, a in zip(kept, allocation, strict=True)]
    layers, heads = shape.num_layers, shape.num_kv_heads
    token_bytes = 2 * shape.head_dim * pool.dtype_bytes  # one token's key and value in one head
    nbytes = sum(held) * heads * token_bytes
    transformers = Layout(nbytes, pool.bytes // nbytes)
    if kind in ("per-head", "per-layer") and work.prompt_tokens > budget:
        packed = _packed(shape, work, pool, kept, held)
        padded = None
        if kind == "per-head" and max_head_ratio is not None:  # without per-head paging: every head the largest
            biggest = min(work.prompt_tokens, math.ceil(max_head_ratio * budget))
            alloc = None if work.decode_budget is None else math.ceil(max_head_ratio * work.decode_budget)
            padded = _paged(shape, work, pool, [peak_held(biggest, work, compressed, alloc)] * layers, compressed)[0]
        return Row(method, budget, kind, sum(kept) / layers, sum(held) / layers, transformers, packed, packed,
                   padded)
    paged, paged_per_layer = _paged(shape, work, pool, held, compressed)
    return Row(method, budget, kind, sum(kept) / layers, sum(held) / layers, transformers, paged, paged_per_layer)


def plan(shape: ModelShape, work: Workload, pool: Pool, methods: list[str], budgets: list[int],
         max_head_ratio: float | None = None) -> Plan:
    """The full cache, then every method at every budget (in the order given)."""
    if max_head_ratio is not None and (isinstance(max_head_ratio, bool) or not isinstance(max_head_ratio, (int, float))
                                       or not max_head_ratio >= 1 or not math.isfinite(max_head_ratio)):
        raise ValueError(f"max_head_ratio is the largest head's kept tokens over the budget (>= 1), "
                         f"got {max_head_ratio!r}")
    if not budgets:
        raise ValueError("give at least one budget")
    result = Plan(shape, work, pool, max_head_ratio)
    result.rows.append(plan_row(shape, work, pool, "full", None))
    for method in methods:
        if budget_kind(method) == "full":
            continue  # always the first row
        for budget in budgets:
            result.rows.append(plan_row(shape, work, pool, method, budget, max_head_ratio))
    result.notes = _notes(result)
    return result


def _notes(p: Plan) -> list[str]:
    notes = []
    kinds = {r.kind for r in p.rows}
    if kinds & {"per-layer", "per-head"}:
        notes.append("paged, per-layer and per-head budgets: every head's kept tokens packed densely into whole "
                     "blocks (mixkv's vLLM plugin; docs/serving.md), so a request holds the method's own memory "
                     "rounded up to one block, whatever the head skew")
    padded = [r for r in p.rows if r.padded is not None]
    if padded:
        fits = ", ".join(f"{r.method}@{r.budget}: {r.padded.requests}" for r in padded)
        notes.append(f"without per-head paging (every head padded to the largest, {p.max_head_ratio:g} x the budget, "
                     f"--max-head-ratio) the pool would fit {fits} requests")
    if p.work.decode_budget is not None:
        notes.append(f"decode budget {p.work.decode_budget}: a compressed head holds at most max(kept, its allocation "
                     f"at {p.work.decode_budget}, {p.work.decode_budget}) + {p.work.decode_every} tokens while "
                     f"decoding (re-compressed at most every {p.work.decode_every} tokens)")
    fitting = sorted({r.budget for r in p.rows if r.budget is not None and r.budget >= p.work.prompt_tokens})
    if fitting:
        notes.append(f"budget {', '.join(map(str, fitting))} >= the prompt ({p.work.prompt_tokens} tokens): "
                     "nothing is compressed there")
    window = p.shape.sliding_window
    if window is not None and window < p.work.prompt_tokens + p.work.output_tokens:
        notes.append(f"{p.shape.name} enables a sliding window of {window} tokens; engines that honour it hold "
                     "fewer tokens for the full cache than counted here")
    if any((r.paged.requests or 0) > VLLM_MAX_NUM_SEQS for r in p.rows):
        notes.append(f"vLLM schedules at most --max-num-seqs requests at once (default {VLLM_MAX_NUM_SEQS} on "
                     ">= 70 GiB GPUs, 256 on smaller ones): raise it to use this capacity")
    return notes
