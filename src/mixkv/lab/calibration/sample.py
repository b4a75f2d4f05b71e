"""One calibration prompt: batch-1 model inputs and, optionally, where its answer is.

Measuring, the run and the data sources all pass this one type around, so it lives on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CalibrationSample:
    """One calibration prompt (batch 1) and, optionally, where its answer is."""

    inputs: dict
    answer_mask: torch.Tensor | None = None  # (N,) bool
    region_mask: torch.Tensor | None = None  # (N,) bool; None: image tokens of a VLM, else all
    answer_text: str | None = None
    name: str = ""
    image: Any = None  # PIL image for pictures (VLM samples)
    grid: tuple[int, int] | None = None  # patch grid (rows, cols) of ``image``
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    def fingerprint(self) -> str:
        """Identifies the prompt (ids and answer mask) so a resumed run can check it sees the same data."""
        h = hashlib.sha256(self.inputs["input_ids"].cpu().numpy().tobytes())
        if self.answer_mask is not None:
            h.update(self.answer_mask.cpu().numpy().tobytes())
        return h.hexdigest()[:16]
