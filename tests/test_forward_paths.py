"""Every forward path under a press works or is refused with a message (issue #24, bugs 1, 6 and 7).

A press hooks every forward of the model: scoring without a cache (a log-likelihood evaluation, a
loss with ``labels=``), attention weights, tuple outputs, a plain forward after ``generate``, and a
forward that raised part-way must each behave as the model does without a press, or say why not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from zoo import make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv.core.cache import CompressedLayer  # noqa: E402

METHODS = ["snapkv+mixkv", "adakv"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llama(request):
    return make_model("llama", attn_implementation=request.param)


@pytest.fixture(scope="module")
def eager():
    return make_model("llama", attn_implementation="eager")


def _inputs(model, batch=2):
    return make_inputs(model, "llama", batch=batch, text_len=80, left_pad=[0, 5][:batch], seed=3)


# ---- bug 1: forwards without a cache, losses, tuples, attention weights ----------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kwargs", [{"use_cache": False}, {"labels": True}, {"return_dict": False},
                                    {"use_cache": True}, {"output_attentions": True}],
                         ids=["no-cache", "labels", "tuple", "cache", "attentions"])
def test_a_prefill_forward_under_a_press_equals_no_press(llama, method, kwargs):
    """A press never changes a prefill's outputs (its attention is exact); it only compresses the cache."""
    inputs = _inputs(llama)
    kwargs = {**kwargs, "labels": inputs["input_ids"]} if kwargs.get("labels") else kwargs
    with torch.no_grad():
        want = llama(**inputs, **kwargs)
        with mixkv.press(llama, method, budget=40, window=8):
            got = llama(**inputs, **kwargs)
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        torch.testing.assert_close(got[0], want[0])
        return
    torch.testing.assert_close(got.logits, want.logits)
    if "labels" in kwargs:
        torch.testing.assert_close(got.loss, want.loss)
    if kwargs.get("output_attentions"):
        assert len(got.attentions) == len(want.attentions)  # eager: one per layer; sdpa: none, as without a press
        for g, w in zip(got.attentions, want.attentions):
            torch.testing.assert_close(g, w)
    if kwargs.get("use_cache") and kwargs.get("use_cache") is not False:
        assert all(isinstance(layer, CompressedLayer) for layer in got.past_key_values.layers)


def test_no_cache_forward_leaves_nothing_behind_for_the_next_generate(llama):
    inputs = _inputs(llama)
    with torch.no_grad():
        plain = llama.generate(**inputs, max_new_tokens=4)
    with torch.no_grad(), mixkv.press(llama, "snapkv", budget=200):  # covers the prompt: no compression
        llama(**inputs, use_cache=False)
        llama(**inputs, labels=inputs["input_ids"])
        pressed = llama.generate(**inputs, max_new_tokens=4)
        after = llama(**inputs, use_cache=False).logits  # a plain forward after a generate
    assert torch.equal(plain, pressed)
    torch.testing.assert_close(after, llama(**inputs, use_cache=False).logits)


# ---- bug 6: a forward that raised part-way ---------------------------------------------------------------

class Interrupt(Exception):
    pass


def _raise_in(model, layer_idx: int):
    """Raise inside layer ``layer_idx``'s attention, after its cache update (as Ctrl-C would), once."""
    attn = model.model.layers[layer_idx].self_attn
    fired = []

    def hook(module, args, kwargs, output):
        if not fired:
            fired.append(True)
            raise Interrupt("interrupted inside layer")

    return attn.register_forward_hook(hook, with_kwargs=True)


def _two_turns(model, method, interrupt_layer=None):
    inputs = make_inputs(model, "llama", text_len=60, seed=4)
    second = torch.randint(8, 250, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), mixkv.press(model, method, budget=24, window=4):
        out = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
        cache = out.past_key_values
        ids = torch.cat([out.sequences, second], 1)
        turn = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cache": cache, "max_new_tokens": 3}
        if interrupt_layer is not None:
            handle = _raise_in(model, interrupt_layer)
            try:
                with pytest.raises(Interrupt):
                    model.generate(**turn)
            finally:
                handle.remove()
        return model.generate(**turn)


@pytest.mark.parametrize("method", METHODS)
def test_a_turn_retried_after_an_exception_is_refused_not_corrupted(eager, method):
    """Layer 0 took the new segment, layer 1 did not: continuing would attend a torn cache."""
    with pytest.raises(RuntimeError, match=r"half-updated.*\[\d+, \d+\]"):
        _two_turns(eager, method, interrupt_layer=1)


def test_an_exception_before_any_layer_changed_lets_the_turn_be_retried(eager):
    """Raised in layer 0's attention before its cache update: nothing changed, so the retry is exact."""
    attn = eager.model.layers[0].self_attn
    fired = [True]  # armed below, for the second turn only

    def early(module, args, kwargs):
        if not fired:
            fired.append(True)
            raise Interrupt("before any update")

    clean = _two_turns(eager, "snapkv")
    handle = attn.register_forward_pre_hook(early, with_kwargs=True)
    try:
        inputs = make_inputs(eager, "llama", text_len=60, seed=4)
        second = torch.randint(8, 250, (1, 16), generator=torch.Generator().manual_seed(5))
        with torch.no_grad(), mixkv.press(eager, "snapkv", budget=24, window=4):
            out = eager.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
            ids = torch.cat([out.sequences, second], 1)
            turn = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cache": out.past_key_values,
                    "max_new_tokens": 3}
            fired.clear()
            with pytest.raises(Interrupt):
                eager.generate(**turn)
            retried = eager.generate(**turn)
    finally:
        handle.remove()
    assert torch.equal(retried, clean)


def test_a_torn_cache_without_a_press_is_not_our_business(eager):
    """Outside a press the model behaves exactly as before (its own error or not)."""
    inputs = make_inputs(eager, "llama", text_len=20, seed=4)
    with torch.no_grad():
        a = eager.generate(**inputs, max_new_tokens=3)
        b = eager.generate(**inputs, max_new_tokens=3)
    assert torch.equal(a, b)


# ---- bug 7: output_attentions while decoding on compressed layers -----------------------------------------

@pytest.mark.parametrize("method", ["adakv", "snapkv", "adakv+mixkv"])
@pytest.mark.parametrize("batch", [1, 2])
def test_attention_weights_while_decoding_have_one_entry_per_layer(eager, method, batch):
    inputs = _inputs(eager, batch)
    with torch.no_grad(), mixkv.press(eager, method, budget=20, window=4):
        out = eager.generate(**inputs, max_new_tokens=4, output_attentions=True, return_dict_in_generate=True)
        layers = out.past_key_values.layers
        widths = [layer.held_view()[0].shape[2] for layer in layers]
    assert len(out.attentions) == 4
    for step in out.attentions[1:]:
        assert len(step) == len(layers)  # was () at batch 1 and 1 entry for 2 layers in a batch (AdaKV)
        for weights in step:
            assert weights.shape[:3] == (batch, 4, 1)
            torch.testing.assert_close(weights.float().sum(-1), torch.ones(batch, 4, 1))
    # The last step's weights span exactly the tokens each layer holds (right-aligned per head).
    assert [w.shape[-1] for w in out.attentions[-1]] == widths


def test_attention_weights_match_the_attention_output(eager):
    """weights @ held values == what the layer's attention returned: the weights are the real ones."""
    inputs = _inputs(eager, 2)
    captured = {}
    attn = eager.model.layers[1].self_attn

    def grab(module, args, kwargs, output):
        captured["out"], captured["weights"] = output[0].detach(), output[1]

    with torch.no_grad(), mixkv.press(eager, "adakv", budget=20, window=4):
        out = eager.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
        layer = out.past_key_values.layers[1]
        handle = attn.register_forward_hook(grab, with_kwargs=True)
        try:
            ids = out.sequences[:, -1:]
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
            eager(input_ids=ids, attention_mask=mask, cache=out.past_key_values, output_attentions=True)
        finally:
            handle.remove()
        _, values, _ = layer.held_view()
    weights = captured["weights"]  # (B, Hq, 1, L)
    mixed = torch.matmul(weights.float(), values.float().repeat_interleave(2, dim=1))  # (B, Hq, 1, D)
    before_o_proj = mixed.transpose(1, 2).reshape(2, 1, -1)
    torch.testing.assert_close(attn.o_proj(before_o_proj), captured["out"], atol=1e-4, rtol=1e-4)


# ---- models the press wraps, or refuses at entry --------------------------------------------------------

def test_a_compiled_forward_gives_the_same_tokens():
    """torch.compile(model.forward): the hooks and the attention function still run (graph breaks there)."""
    model = make_model("llama")
    inputs = make_inputs(model, "llama", text_len=60)
    with torch.no_grad(), mixkv.press(model, "snapkv", budget=20, window=4):
        want = model.generate(**inputs, max_new_tokens=4)
    model.forward = torch.compile(model.forward)
    with torch.no_grad(), mixkv.press(model, "snapkv", budget=20, window=4) as session:
        got = model.generate(**inputs, max_new_tokens=4)
    assert torch.equal(got, want) and session.stats.layers_compressed == 2


def test_an_attention_implementation_without_a_mask_function_is_refused_at_entry():
    model = make_model("llama", attn_implementation="paged|eager")
    with pytest.raises(ValueError, match="has no mask function"), mixkv.press(model, "snapkv", budget=64):
        pass
    assert model.config._attn_implementation == "paged|eager"  # nothing half-applied
