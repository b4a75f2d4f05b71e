"""Calibration profiles: values equal a direct computation, mismatches raise, interruption is safe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_inputs, make_model  # noqa: E402

from mixkv import MixKV, SnapKV, SparseMM, load_profile, press  # noqa: E402
from mixkv.lab import calibration as cal  # noqa: E402
from mixkv.lab.calibration import CalibrationSample, calibrate, partial_path  # noqa: E402
from mixkv.lab.calibration import run as cal_run  # noqa: E402  (calibrate looks measure up here)


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", attn_implementation="eager")


def _sample(model, seed: int, pad: int = 0, answer: list[int] | None = None, text_len: int = 40):
    inputs = make_inputs(model, "llama", text_len=text_len, seed=seed, left_pad=[pad])
    n = inputs["input_ids"].shape[1]
    mask = None
    if answer is not None:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[answer] = True
    return CalibrationSample(inputs, answer_mask=mask, name=f"s{seed}")


def _pairwise_redundancy(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(H,) explicit mean over i != j of cos(x_i, x_j), valid tokens only, clamped to [0, 1]."""
    idx = valid.nonzero().flatten().tolist()
    out = torch.zeros(states.shape[0], dtype=torch.float64)
    for h in range(states.shape[0]):
        total, count = 0.0, 0
        for i in idx:
            for j in idx:
                if i != j:
                    total += float(F.cosine_similarity(states[h, i].double(), states[h, j].double(), dim=0))
                    count += 1
        out[h] = min(max(total / count, 0.0), 1.0)
    return out


def test_redundancy_equals_explicit_pairwise_loop(llama, tmp_path):
    samples = [_sample(llama, 1), _sample(llama, 2, pad=6)]  # the second has left padding
    profile = calibrate(llama, samples, tmp_path / "p.json", progress=False)
    expected_k = torch.zeros(2, 2, dtype=torch.float64)
    expected_v = torch.zeros_like(expected_k)
    for s in samples:
        with torch.no_grad():
            out = llama(**s.inputs, use_cache=True)
        valid = s.inputs["attention_mask"][0].bool()
        for layer in range(2):
            kv = out.past_key_values.layers[layer]
            expected_k[layer] += _pairwise_redundancy(kv.keys[0], valid) / len(samples)
            expected_v[layer] += _pairwise_redundancy(kv.values[0], valid) / len(samples)
    torch.testing.assert_close(profile.key_redundancy.double(), expected_k, atol=1e-5, rtol=0)
    torch.testing.assert_close(profile.value_redundancy.double(), expected_v, atol=1e-5, rtol=0)
    assert profile.head_scores is None  # no answer regions
    saved = load_profile(tmp_path / "p.json")
    torch.testing.assert_close(saved.key_redundancy, profile.key_redundancy)
    assert saved.model and saved.library_version and saved.data["prompts"] == 2
    assert not partial_path(tmp_path / "p.json").exists()


def test_head_scores_equal_eager_attention_of_decoding_steps(llama, tmp_path):
    answers = [[5, 6, 7, 20], [11, 30]]
    samples = [_sample(llama, 3, answer=answers[0]), _sample(llama, 4, answer=answers[1])]
    steps = 4
    profile = calibrate(llama, samples, tmp_path / "p.json", max_new_tokens=steps, hits_on="all", progress=False)
    hits = torch.zeros(2, 2, dtype=torch.float64)
    for s, ans in zip(samples, answers):
        n = s.length
        out = llama.generate(**s.inputs, max_new_tokens=steps, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
        for per_layer in out.attentions:  # step j: attention of the query that produced token j
            for layer, attn in enumerate(per_layer):
                top = attn[0, :, -1, :n].argmax(-1)  # (Hq,) strongest attention over the prompt
                hit = torch.tensor([float(int(t) in ans) for t in top], dtype=torch.float64)
                hits[layer] += hit.view(2, 2).mean(-1)  # 4 query heads, 2 KV heads
    torch.testing.assert_close(profile.head_scores.double(), hits / (steps * len(samples)), atol=1e-6, rtol=0)
    assert profile.data["counted_steps"] == steps * len(samples)
    assert profile.data["prompts_with_answer"] == 2


def test_region_argmax_hits_by_hand():
    keys = torch.eye(4)[None, None]  # (1, 1, 4, 4): one KV head, token i = e_i
    queries = torch.tensor([[[[0.0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]],  # (1, 2, 3, 4): 2 query heads
                             [[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]]])
    region = torch.tensor([[True, True, True, False]])
    answer = torch.tensor([[False, False, True, False]])
    # step 0: both query heads' best region token is 2 (hit); step 1: head 0's e_3 is outside the region, so
    # its best region token is 0 (miss), head 1 picks 0 (miss); step 2: both pick 1 (miss)
    hits = cal.region_argmax_hits(queries, keys, region, answer)
    assert hits.shape == (1, 1)
    assert float(hits[0, 0]) == pytest.approx(1.0)
    only_last = cal.region_argmax_hits(queries, keys, region, answer, torch.tensor([[False, False, True]]))
    assert float(only_last[0, 0]) == 0.0


def test_counted_steps():
    assert cal.counted_steps([" The", " 4", "8", "213", ".", " "], "48213") == [False, True, True, True, False,
                                                                                False]
    assert cal.counted_steps(["a", "b"], None) == [True, True]


def test_mismatched_profile_raises_on_use(llama, tmp_path):
    samples = [_sample(llama, 5, answer=[3, 4])]
    profile = calibrate(llama, samples, tmp_path / "p.json", max_new_tokens=2, hits_on="all", progress=False)
    other = make_model("llama", num_layers=3)
    inputs = make_inputs(other, "llama")
    for method in (MixKV(SnapKV(budget=16, window=4), redundancy=profile),
                   MixKV(SnapKV(budget=16, window=4), redundancy=str(tmp_path / "p.json")),
                   SparseMM(budget=16, window=4, head_scores=profile)):
        with pytest.raises(ValueError, match="layers x"), press(other, method):
            other(**inputs)
    with press(llama, MixKV(SnapKV(budget=16, window=4), redundancy=profile)):  # the right model works
        llama.generate(**samples[0].inputs, max_new_tokens=2, do_sample=False)


def test_interrupt_leaves_no_profile_and_resume_completes(llama, tmp_path, monkeypatch):
    samples = [_sample(llama, 10 + i, answer=[4, 5]) for i in range(4)]
    kw = dict(max_new_tokens=2, hits_on="all", progress=False, data={"source": "test"})
    reference = calibrate(llama, samples, tmp_path / "ref.json", **kw)
    out = tmp_path / "sub" / "profile.json"
    real = cal.measure
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(cal_run, "measure", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(llama, samples, out, save_every=5, **kw)
    assert not out.exists()
    partial = partial_path(out)
    assert json.loads(partial.read_text())["state"]["prompts"] == 2  # saved on the way out
    assert not any(p.name == "profile.json" for p in out.parent.iterdir())
    with pytest.raises(ValueError, match="--resume"):
        calibrate(llama, samples, out, **kw)
    with pytest.raises(ValueError, match="differs"):  # other prompts than the interrupted run's
        calibrate(llama, samples[::-1], out, resume=True, **kw)
    calls["n"] = -100
    profile = calibrate(llama, samples, out, resume=True, **kw)
    assert calls["n"] == -98  # only the two missing prompts were measured
    assert out.exists() and not partial.exists()
    for name in ("key_redundancy", "value_redundancy", "head_scores", "retrieval_scores"):
        torch.testing.assert_close(getattr(profile, name), getattr(reference, name))
    assert load_profile(out).data == reference.data


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 7, **{f"w{i}": i for i in range(8, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


def test_jsonl_data_and_command(llama, tmp_path):
    tokenizer = _word_tokenizer()
    lines = [
        {"prompt": " ".join(f"w{8 + (i * 7) % 200}" for i in range(40)) + " w250 w251 w9", "chat": False,
         "answer_span": [0, 7], "answer": "w8 w15"},
        {"prompt": " ".join(f"w{20 + (i * 3) % 100}" for i in range(50)), "chat": False},
    ]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples, desc = cal.read_jsonl(data, tokenizer)
    assert len(samples) == 2 and desc["n"] == 2 and desc["source"] == str(data)
    assert samples[0].answer_mask.nonzero().flatten().tolist() == [0, 1]  # "w8 w15" = the first two tokens
    assert samples[1].answer_mask is None

    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    from mixkv.cli import calibrate as cmd

    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "cli.json"
    args = parser.parse_args(["calibrate", "--model", str(model_dir), "--data", str(data), "--n", "2", "--out",
                              str(out), "--hits-on", "all", "--max-new-tokens", "3", "--threads", "1"])
    assert args.run(args) == 0
    profile = load_profile(out)
    assert (profile.num_layers, profile.num_kv_heads) == (2, 2)
    assert profile.head_scores is not None and profile.data["counted_steps"] == 3
    assert profile.data["source"] == str(data) and profile.data["prompts"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w8 w9", "answer_span": [0, 99]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        cal.read_jsonl(bad, tokenizer)
