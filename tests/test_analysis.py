"""Analysis maths and figures: values against direct computations, PNGs of the expected pixel size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_config, make_inputs, make_model  # noqa: E402

from mixkv.core import scores
from mixkv.core.selection import KeepPlan  # noqa: E402
from mixkv.lab import analysis, analysis_figures, analyze  # noqa: E402
from mixkv.lab.calibration import CalibrationSample, calibrate, text_sample  # noqa: E402


def _check_png(path: Path, kind: str) -> None:
    assert path.is_file() and path.stat().st_size > 5000, f"{path} missing or nearly empty"
    with Image.open(path) as img:
        assert img.size == analysis_figures.expected_pixels(kind)
        assert sum(1 for c in img.convert("L").histogram() if c) > 20  # something was drawn


def test_token_similarity_matches_pairwise_loop():
    torch.manual_seed(0)
    states = torch.randn(2, 3, 9, 8) + 0.5
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    sim = analysis.token_similarity(states, valid)
    for b in range(2):
        idx = valid[b].nonzero().flatten().tolist()
        for h in range(3):
            for i in idx:
                others = [float(F.cosine_similarity(states[b, h, i], states[b, h, j], dim=0)) for j in idx if j != i]
                assert float(sim[b, h, i]) == pytest.approx(sum(others) / len(others), abs=1e-5)
    assert torch.isnan(sim[1, :, :3]).all()
    # its mean over tokens is the head's redundancy (unclamped here: the data is positively correlated)
    torch.testing.assert_close(sim[1, :, 3:].mean(-1), scores.redundancy(states, valid)[1], atol=1e-5, rtol=0)


def test_project_2d_finds_the_main_directions():
    torch.manual_seed(1)
    t = torch.randn(200, 1)
    u = torch.randn(200, 1)
    x = t * torch.tensor([[3.0, 0, 0, 0]]) + u * torch.tensor([[0, 0, 1.0, 0]]) + 0.01 * torch.randn(200, 4)
    coords, explained = analysis.project_2d(x)
    assert coords.shape == (200, 2)
    assert explained[0] > 0.8 and explained.sum() > 0.99
    assert abs(float(torch.corrcoef(torch.stack([coords[:, 0], t[:, 0]]))[0, 1])) > 0.99
    again, _ = analysis.project_2d(x)
    torch.testing.assert_close(coords, again)  # deterministic signs


def test_repeated_sentence_spans():
    text = "Blank here. A fact: 42. Blank here. Question?"
    rep, uni = analysis.repeated_sentence_spans(text)
    assert [text[a:b].strip() for a, b in rep] == ["Blank here.", "Blank here."]
    assert [text[a:b].strip() for a, b in uni] == ["A fact: 42.", "Question?"]


def test_kept_share_and_patch_figure(tmp_path):
    n, rows, cols = 30, 4, 4
    positions = torch.arange(5, 5 + rows * cols)
    idx = torch.tensor([[[5, 6, 7, 28, 29], [10, 11, 12, 28, 29]]])  # (B=1, H=2, L=5)
    plan = KeepPlan(idx, torch.tensor([[5, 3]]))
    share = analysis.kept_share({0: plan}, 2, n)  # layer 1 has no plan: keeps everything
    assert float(share[5]) == pytest.approx((0.5 + 1.0) / 2)
    assert float(share[12]) == pytest.approx(0.75)  # head 1 keeps only 10, 11, 12 (length 3)
    assert float(share[28]) == pytest.approx(0.75)  # past head 1's length: filler, not kept
    assert float(share[8]) == pytest.approx(0.5)  # kept only by the uncompressed layer
    assert analysis.kept_share({0: plan}, 2, n, layer=0, head=1)[10:13].tolist() == [1.0, 1.0, 1.0]

    image = Image.new("RGB", (64, 64), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle([16, 0, 31, 15], fill=(220, 30, 30))
    draw.ellipse([32, 32, 47, 47], fill=(30, 70, 220))
    other = KeepPlan(torch.tensor([[[8, 9, 14, 20, 29], [5, 15, 25, 28, 29]]]), torch.tensor([[5, 5]]))
    path = analysis_figures.plot_kept_patches(
        image, (rows, cols), positions, {"SnapKV": {0: plan}, "MixKV": {0: other}}, num_layers=1, n=n,
        path=tmp_path / "patches.png", title="tiny: layer 0, budget 5", answer_patches=[1, 10])
    _check_png(path, "patches")
    with pytest.raises(ValueError, match="patch grid"):
        analysis_figures.plot_kept_patches(image, (3, 3), positions, {"a": {0: plan}}, 1, n, tmp_path / "x.png", "t")


def test_analyze_vlm_draws_all_four_figures(tmp_path):
    model = make_model("llava", num_layers=3)
    inputs = make_inputs(model, "llava", text_len=24, seed=2)
    ids = inputs["input_ids"][0]
    positions = (ids == model.config.image_token_id).nonzero().flatten()
    assert positions.numel() == 64
    answer = torch.zeros(ids.shape[0], dtype=torch.bool)
    answer[positions[[9, 10, 27]]] = True
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(image).rectangle([4, 4, 11, 7], fill=(200, 20, 20))
    sample = CalibrationSample(inputs, answer, None, "red", "img", image=image, grid=(8, 8),
                               meta={"image_positions": positions})
    profile = calibrate(model, [sample], tmp_path / "p.json", max_new_tokens=2, hits_on="all", progress=False)
    result = analyze.analyze(model, [sample], tmp_path / "fig", model_name="tiny-llava", budget=24, window=4,
                              profile=profile)
    assert set(result.files) == {"heatmap", "histograms", "coverage", "patches", "head_scores"}, result.skipped
    for kind, path in result.files.items():
        _check_png(path, kind)
    s = result.summary
    assert 1 <= s["layer"] < 3 and set(s["group_similarity_mean"]) == {"image tokens", "text tokens"}
    assert s["redundancy_max"] == pytest.approx(float(profile.key_redundancy.max()))
    assert set(s["answer_tokens_kept_share"]) == {"SnapKV (budget 24)", "SnapKV + MixKV (budget 24)"}


def test_analyze_text_prompt(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["blank", "here", "fact", "is", "the", "key", "what", ".", "?"]
    tok = Tokenizer(models.WordLevel({"[UNK]": 7, **{w: 8 + i for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    message = "blank here . " * 12 + "the key is fact . " + "blank here . " * 10 + "what is the key ?"
    at = message.index("fact")
    sample = text_sample(tokenizer, message, [(at, at + 4)], "fact", chat=False)
    model = make_model("llama")
    result = analyze.analyze(model, [sample], tmp_path, model_name="tiny-llama", budget=20, window=4,
                              layer=1, head=1)
    assert set(result.files) == {"heatmap", "histograms", "coverage"}
    assert "patches" in result.skipped
    assert (result.summary["layer"], result.summary["head"]) == (1, 1)
    for kind, path in result.files.items():
        _check_png(path, kind)
    groups = result.summary["group_similarity_mean"]
    assert set(groups) == {"repeated sentences (filler)", "unique sentences (facts, question)"}


def test_toy_vlm_generator_plugs_in(tmp_path):
    """The toy VLM's generated samples feed calibration and the patch picture (tiny random LLaVA, 16x16 patches)."""
    toyvlm = pytest.importorskip("mixkv.testbeds.toyvlm")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from mixkv.lab.calibration import generated_samples

    tok = Tokenizer(models.WordLevel({"[UNK]": 7, **{f"w{i}": i for i in range(8, 256)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    grid = toyvlm.generator.GRID
    config = make_config("llava")
    config.vision_config.image_size = grid * 4  # patch 4 -> one visual token per grid cell
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = toyvlm.ToyVLMProcessor(tokenizer, config.image_token_id, image_size=grid * 4)
    samples, data = generated_samples("tiny", processor, 2, seed=5)
    assert data["source"] == "generated:toyvlm" and len(samples) == 2
    s = samples[0]
    assert s.grid == (grid, grid) and s.meta["image_positions"].numel() == grid * grid
    assert bool(s.answer_mask[s.meta["image_positions"]].any())
    profile = calibrate(model, samples, tmp_path / "p.json", data=data, decode=processor.decode, max_new_tokens=2,
                        hits_on="all", progress=False)
    assert profile.head_scores is not None and profile.data["source"] == "generated:toyvlm"
    result = analyze.analyze(model, samples[:1], tmp_path, model_name="tiny-toyvlm", budget=64, window=8)
    _check_png(result.files["patches"], "patches")
