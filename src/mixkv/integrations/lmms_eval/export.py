"""Export the toy VLM's evaluation samples to local files plus the lmms-eval task that reads them.

    python -m mixkv.integrations.lmms_eval.export --out out/lmms-toyvlm --seed 0 --n 10

writes ``<out>/data/<task>.jsonl`` and ``<out>/data/images/<task>-<seed>.png`` for the same samples
``mixkv eval --model toy-vlm --seed S --n N --tasks T`` evaluates (``make_sample(S + i, task=t)`` for every
task ``t``, ``i < N``), and copies the task YAMLs shipped in ``tasks/toyvlm/`` next to them; then
``lmms-eval --include_path <out> --tasks toyvlm`` (or ``toyvlm_colour`` ...) runs them. No hub, no network.

Decisions:

* one lmms-eval task per toy task (``toyvlm_colour``, ``toyvlm_shape``, ``toyvlm_text``, ``toyvlm_count``) and a
  group ``toyvlm`` of the three ``mixkv eval`` runs by default, so per-task accuracies line up with its table;
* images are lossless PNG files, read back pixel-identical to the generator's (a test checks it); each JSONL
  row stores the image's absolute path, so an exported folder is not meant to be moved: export again (it
  takes a second) instead;
* a row keeps ``seed``, ``task``, ``question``, ``answer`` and ``choices``: the task's scorer rebuilds the
  sample from ``seed`` and ``task`` and scores with :func:`mixkv.testbeds.toyvlm.generator.score`, the
  function ``mixkv eval`` uses, after checking that the row's answer is the generator's;
* the YAMLs only exist in the package and are copied, so task definition and data never drift apart;
  ``--n`` / ``--seed`` / ``--tasks`` are written to ``<out>/export.json`` for the record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ...testbeds.toyvlm import generator as gen

TASKS_DIR = Path(__file__).resolve().parent / "tasks" / "toyvlm"
TASK_PREFIX = "toyvlm_"


@dataclass(frozen=True)
class ExportRow:
    """One JSONL row of an exported toy task."""

    doc_id: int
    seed: int
    task: str
    question: str
    answer: str
    choices: list[str]
    image: str  # absolute path of the PNG


def samples_for(tasks: Sequence[str], n: int, seed: int) -> dict[str, list[gen.Sample]]:
    """The samples ``mixkv eval --model toy-vlm`` evaluates, per task, in its order."""
    unknown = [t for t in tasks if t not in gen.TASKS]
    if unknown:
        raise ValueError(f"unknown toy-vlm task(s) {unknown}; accepted: {', '.join(gen.TASKS)}")
    if n < 1 or seed < 0:
        raise ValueError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    return {t: [gen.make_sample(seed + i, task=t) for i in range(n)] for t in tasks}


def export(out: str | Path, n: int, seed: int = 0, tasks: Sequence[str] = gen.DEFAULT_TASKS) -> dict[str, Path]:
    """Write data files and task YAMLs under ``out``; returns ``{task: jsonl path}``."""
    out = Path(out).expanduser().resolve()
    data, images = out / "data", out / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task, samples in samples_for(tuple(tasks), n, seed).items():
        path = data / f"{task}.jsonl"
        with path.open("w") as fh:
            for i, s in enumerate(samples):
                png = images / f"{task}-{s.seed}.png"
                s.image.save(png, format="PNG")
                row = ExportRow(doc_id=i, seed=s.seed, task=task, question=s.question, answer=s.answer,
                                choices=list(s.choices), image=str(png))
                fh.write(json.dumps(asdict(row)) + "\n")
        written[task] = path
    for yaml in sorted(TASKS_DIR.glob("*.yaml")) + [TASKS_DIR / "_default_template_yaml"]:
        shutil.copyfile(yaml, out / yaml.name)
    (out / "export.json").write_text(json.dumps({"n": n, "seed": seed, "tasks": list(tasks)}, indent=2) + "\n")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixkv.integrations.lmms_eval.export",
                                description="Export the toy VLM's evaluation samples and the lmms-eval task.")
    p.add_argument("--out", required=True, help="folder to write (give it to lmms-eval as --include_path)")
    p.add_argument("--n", type=int, default=20, help="samples per task (as mixkv eval --n)")
    p.add_argument("--seed", type=int, default=0, help="first seed (as mixkv eval --seed)")
    p.add_argument("--tasks", default=",".join(gen.DEFAULT_TASKS), help=f"comma list of {', '.join(gen.TASKS)}")
    args = p.parse_args(argv)
    try:
        written = export(args.out, args.n, args.seed, [t.strip() for t in args.tasks.split(",") if t.strip()])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, path in written.items():
        print(f"{TASK_PREFIX}{task}: {args.n} samples -> {path}")
    print(f"lmms-eval --include_path {Path(args.out).resolve()} --tasks "
          f"{','.join(TASK_PREFIX + t for t in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
