"""Our toy VLM as an ordinary lmms-eval model (``--model toy_vlm``; with mixkv: ``--model mixkv_toy_vlm``).

It is written the way lmms-eval's own simple wrappers are (``llava_hf``, ``qwen2_5_vl``): requests are sorted
and batched with ``lmms_eval.utils.Collator``, images come from the task's ``doc_to_visual``, the batch is
left-padded, ``self.model.generate`` decodes, ``Collator.get_original`` restores the order. So the mixkv
twin exercises the same path (press around ``generate``, order mapping) as on a real model, offline on CPU.

Decisions: the prompt is :class:`mixkv.testbeds.toyvlm.model.ToyVLMProcessor`'s (chat template, ``<image>``
then the question and " Answer in one sentence."), i.e. exactly what ``mixkv eval --model toy-vlm`` feeds;
the task's ``doc_to_text`` therefore returns the bare question. Decoding is greedy whatever the task asks
(the toy VLM was trained for greedy answers, and ``mixkv eval`` decodes greedily); ``max_new_tokens`` comes
from the task (the toy task says 20, ``mixkv eval``'s default); ``until`` strings cut the text as in
lmms-eval's wrappers. ``threads`` sets torch's CPU threads (default: torch's own choice).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from ...testbeds import sources


class ToyVLM(lmms):
    """lmms-eval model for mixkv's trained toy VLM (SmolLM2-135M inside a LLaVA)."""

    is_simple = True

    def __init__(self, pretrained: str = sources.TOY_VLM, dtype: str = "float32", batch_size: int | str = 1,
                 device: str = "cpu", threads: int | None = None, max_new_tokens: int = 20, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"toy_vlm: unknown model_args {sorted(kwargs)}; accepted: pretrained, dtype, "
                             "batch_size, device, threads, max_new_tokens")
        if not sources.is_toy_vlm(str(pretrained)):
            raise ValueError(f"toy_vlm: pretrained must be {sources.TOY_VLM!r}, got {pretrained!r}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self._model, self.processor = sources.load(sources.TOY_VLM, dtype, device=str(device))
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"toy_vlm: batch_size must be >= 1, got {batch_size!r}")
        self.default_max_new_tokens = int(max_new_tokens)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("toy_vlm only generates (the toy tasks are generate_until)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("toy_vlm answers single-turn questions only")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        def _collate(x):
            return -len(self.processor.prompt_ids(x[0])), x[0]

        re_ords = utils.Collator([req.args for req in requests], _collate, grouping=True)
        results: list[GenerationResult] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        bar = tqdm(total=len(requests), disable=(self.rank != 0), desc="toy_vlm")
        for chunk in re_ords.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_id, task, split = zip(*chunk)
            images = []
            for fn, i, t, s in zip(doc_to_visual, doc_id, task, split):
                visual = fn(self.task_dict[t][s][i])
                if len(visual) != 1:
                    raise ValueError(f"toy_vlm takes exactly one image per question, got {len(visual)}")
                images.append(visual[0])
            gen_kwargs = dict(all_gen_kwargs[0])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens))
            inputs = self.processor(images=images, text=list(contexts))
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                          eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad)
            width = inputs["input_ids"].shape[1]
            for row, mask in zip(out, inputs["attention_mask"]):
                new = row[width:].tolist()
                eos = self.tokenizer.eos_token_id
                if eos in new:  # generate pads finished rows after their eos: drop eos and what follows
                    new = new[: new.index(eos) + 1]
                text = self.processor.decode(new, skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(GenerationResult(text=text, token_counts=TokenCounts(
                    input_tokens=int(mask.sum()), output_tokens=len(new))))
            bar.update(len(chunk))
        bar.close()
        return re_ords.get_original(results)
