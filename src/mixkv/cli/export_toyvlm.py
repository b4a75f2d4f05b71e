"""``mixkv export-toyvlm``: write a shipped toy VLM as a standard transformers LLaVA folder (float32 weights,
config, tokenizer and chat template, image processor, processor) that ``vllm serve`` loads as it is; see
:mod:`mixkv.testbeds.toyvlm.export`."""

from __future__ import annotations

import time

from ..testbeds import sources


def add_parser(sub) -> None:
    p = sub.add_parser("export-toyvlm", help="write a toy VLM as a LLaVA folder that vLLM and transformers load")
    p.add_argument("--out", required=True, help="folder to write (created; an earlier export there is reused)")
    p.add_argument("--model", default=sources.TOY_VLM_24, choices=[sources.TOY_VLM_24, sources.TOY_VLM],
                   help=f"which shipped toy VLM (default {sources.TOY_VLM_24})")
    p.add_argument("--force", action="store_true", help="write again even when --out holds this export")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..testbeds.toyvlm.export import export_toy_vlm

    started = time.perf_counter()
    done = export_toy_vlm(args.out, name=args.model, force=args.force)
    if done.reused:
        print(f"{done.path}: already holds {args.model} (use --force to write it again)")
    else:
        print(f"wrote {done.path}: {args.model} as LlavaForConditionalGeneration, {done.tensors} tensors, "
              f"{done.bytes / 2**20:.0f} MiB float32, in {time.perf_counter() - started:.0f} s")
    return 0
