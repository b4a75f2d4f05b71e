"""A per-step log of the scheduler, one JSON object per line, for benchmarks in any process layout.

vLLM runs its scheduler in the engine-core process; a benchmark in the front-end process cannot
read ``len(scheduler.running)`` directly. The plugin appends a line per step to
``MIXKV_VLLM_TRACE``; :func:`read_trace` turns the file back into records.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StepRecord:
    """The scheduler right after one ``schedule()`` call."""

    t: float
    running: int
    waiting: int
    scheduled_tokens: int
    free_blocks: int
    total_blocks: int
    compressed: int  # requests holding a compressed cache
    freed_blocks: int  # blocks returned by compression in this step
    # preemptions in this step (traces written before these fields existed read as none)
    preempted: list[str] = field(default_factory=list)  # request ids, in order
    preempted_outputs: list[int] = field(default_factory=list)  # output tokens each had when preempted


class TraceWriter:
    """Appends :class:`StepRecord` lines; the file is opened once and flushed per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: StepRecord) -> None:
        self._fh.write(json.dumps(asdict(record)) + "\n")
        self._fh.flush()


def now() -> float:
    return time.time()


def read_trace(path: str | Path) -> list[StepRecord]:
    """Records of a trace file (an absent file has none)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [StepRecord(**json.loads(line)) for line in p.read_text().splitlines() if line.strip()]
