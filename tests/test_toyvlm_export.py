"""`mixkv export-toyvlm`: the toy VLM as a standard LLaVA folder (what vLLM serves) behaves as ``load_toy_vlm``.

The folder is loaded back with transformers' own classes (``LlavaForConditionalGeneration.from_pretrained``,
``AutoProcessor.from_pretrained``) and must give the same token ids, pixels, logits and greedy answers on
held-out samples as the toy VLM built by :func:`load_toy_vlm` (the shared ``toy_vlm_24`` fixture).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mixkv.cli.main import main
from mixkv.testbeds.toyvlm import export as ex
from mixkv.testbeds.toyvlm import generator as gen
from mixkv.testbeds.toyvlm import model as tv

HELD_OUT = [(0, "colour"), (1, "count")]  # as `mixkv eval --model toy-vlm-24` draws them (seeds 0.., each task)


@pytest.fixture(scope="module")
def exported(toy_vlm_24, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "toy-vlm-24-hf"
    done = ex.export_toy_vlm(out, loaded=toy_vlm_24)
    assert not done.reused and done.tensors > 0
    return out


@pytest.fixture(scope="module")
def reloaded(exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(exported), dtype=torch.float32,
                                                                 attn_implementation="sdpa", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval(), AutoProcessor.from_pretrained(str(exported))


def messages(question: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images
             + [{"type": "text", "text": question + tv.PROMPT_SUFFIX}]}]


def test_folder_holds_a_standard_llava(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith(".partial") for n in names)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["image_token_index"] == 16
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "default")
    assert config["projector_hidden_act"] == "gelu" and config["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    assert prefixes == {"language_model.model", "vision_tower.vision_model", "multi_modal_projector.linear_1",
                        "multi_modal_projector.linear_2"}


def test_same_ids_pixels_logits_and_answers_as_load_toy_vlm(toy_vlm_24, reloaded):
    model, proc = toy_vlm_24
    model2, proc2 = reloaded
    assert proc2.image_token == tv.IMAGE_TOKEN and proc2.tokenizer.convert_tokens_to_ids(tv.IMAGE_TOKEN) == 16
    for seed, task in HELD_OUT:
        s = gen.make_sample(seed, task=task, grid=24)
        ours = proc.sample_inputs(s)
        text = proc2.apply_chat_template(messages(s.question), add_generation_prompt=True, tokenize=False)
        theirs = proc2(images=s.image, text=text, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert int((theirs["input_ids"] == 16).sum()) == 576
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        with torch.no_grad():
            a = model(**ours).logits
            b = model2(input_ids=theirs["input_ids"], pixel_values=theirs["pixel_values"],
                       attention_mask=theirs["attention_mask"]).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        new = len(proc.tokenizer(s.reply, add_special_tokens=False)["input_ids"]) + 4
        with torch.no_grad():
            ga = model.generate(**ours, max_new_tokens=new, do_sample=False)
            gb = model2.generate(**theirs, max_new_tokens=new, do_sample=False)
        assert ga.tolist() == gb.tolist()
        reply = proc2.decode(gb[0, theirs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert gen.score(s, reply) == 1.0, reply


def test_image_processor_matches_the_toy_processor_on_any_size(toy_vlm_24, reloaded):
    _, proc = toy_vlm_24
    _, proc2 = reloaded
    image = gen.make_sample(5, task="text", grid=24).image
    for size in [(384, 384), (500, 300), (200, 200)]:
        im = image.resize(size)
        assert torch.equal(proc.pixel_values(im), proc2.image_processor(im, return_tensors="pt")["pixel_values"])


def test_chat_template_renders_the_toy_prompt(toy_vlm_24, reloaded):
    _, proc = toy_vlm_24
    _, proc2 = reloaded
    q = "What colour is the star?"
    want = proc.prompt_text(q).replace(tv.IMAGE_PLACEHOLDER, tv.IMAGE_TOKEN)
    assert proc2.apply_chat_template(messages(q), add_generation_prompt=True, tokenize=False) == want
    as_string = [{"role": "user", "content": f"{tv.IMAGE_PLACEHOLDER}\n{q}{tv.PROMPT_SUFFIX}"}]
    assert proc2.apply_chat_template(as_string, add_generation_prompt=True, tokenize=False) == want
    two = proc2.apply_chat_template(messages(q, images=2), add_generation_prompt=True, tokenize=False)
    assert f"{tv.IMAGE_TOKEN}\n{tv.IMAGE_TOKEN}\n{q}" in two
    assert proc.tokenizer.chat_template != ex.CHAT_TEMPLATE  # the toy's own processor is left as it was


def test_cli_reuses_an_export_and_refuses_a_foreign_folder(exported, tmp_path, capsys):
    assert ex.is_exported(exported)
    assert main(["export-toyvlm", "--out", str(exported)]) == 0  # nothing loaded: the stamp matches
    assert "already holds toy-vlm-24" in capsys.readouterr().out
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export-toyvlm", "--out", str(foreign)]) == 2
    assert "not a toy VLM export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_checkpoint_names():
    assert ex.checkpoint_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "language_model.model.layers.0.mlp.up_proj.weight"
    assert ex.checkpoint_name("model.vision_tower.embeddings.class_embedding") == \
        "vision_tower.vision_model.embeddings.class_embedding"
    assert ex.checkpoint_name("model.vision_tower.vision_model.pre_layrnorm.weight") == \
        "vision_tower.vision_model.pre_layrnorm.weight"
    assert ex.checkpoint_name("model.multi_modal_projector.linear_1.bias") == "multi_modal_projector.linear_1.bias"
    assert ex.checkpoint_name("lm_head.weight") == "language_model.lm_head.weight"
    with pytest.raises(ValueError, match="unexpected tensor"):
        ex.checkpoint_name("something.else")


# ---- the venv shim that lets vLLM's LLaVA import without torchvision (scripts/vllm_env.sh installs it) ----

SHIM = Path(__file__).resolve().parents[1] / "src" / "mixkv" / "envs" / "vllm_no_torchvision.py"


def test_torchvision_shim_serves_the_pil_pixtral_module():
    spec = importlib.util.spec_from_file_location("mixkv_shim_under_test", SHIM)
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    if not shim.torchvision_missing():
        pytest.skip("torchvision is installed here: the shim stands aside")
    saved = sys.modules.pop(shim.TARGET, None)
    shim.install()
    shim.install()  # once only
    try:
        assert sum(isinstance(f, shim.PixtralWithoutTorchvision) for f in sys.meta_path) == 1
        module = importlib.import_module(shim.TARGET)
        fallback = importlib.import_module(shim.FALLBACK)
        assert module._num_image_tokens is fallback._num_image_tokens
        assert module._num_image_tokens((384, 384), (16, 16)) == (24, 24)
        assert module.PixtralImageProcessor is fallback.PixtralImageProcessorPil
        assert shim.PixtralWithoutTorchvision().find_spec("transformers.models.llava") is None
    finally:
        shim.uninstall()
        sys.modules.pop(shim.TARGET, None)
        if saved is not None:
            sys.modules[shim.TARGET] = saved
    assert not any(isinstance(f, shim.PixtralWithoutTorchvision) for f in sys.meta_path)
