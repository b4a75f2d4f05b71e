"""The running sums of a calibration run: one :class:`Measurement` added per prompt, the profile at the end.

They round-trip through JSON so an interrupted run can resume (:mod:`.run` writes them to the partial
file), and :meth:`Accumulator.check` refuses a saved state whose counts and sums no real run could make.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...core.profiles import Profile

if TYPE_CHECKING:
    from .measuring import Measurement


@dataclass
class Accumulator:
    """Running sums over calibration prompts; JSON round-trips for the partial file."""

    num_layers: int
    num_kv_heads: int
    key_sum: torch.Tensor | None = None  # (L, H) float64
    value_sum: torch.Tensor | None = None
    hits_sum: torch.Tensor | None = None
    retrieval_sum: torch.Tensor | None = None  # HeadKV-R2 mass, summed over counted steps
    prompts: int = 0
    steps: int = 0  # counted decoding steps (SparseMM)
    answered: int = 0  # prompts with an answer region
    done: list[str] = field(default_factory=list)  # fingerprints, in order

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_kv_heads)
        for name in ("key_sum", "value_sum", "hits_sum", "retrieval_sum"):
            value = getattr(self, name)
            value = torch.zeros(shape, dtype=torch.float64) if value is None else torch.as_tensor(value,
                                                                                                 dtype=torch.float64)
            if value.shape != shape:
                raise ValueError(f"partial calibration: {name} has shape {tuple(value.shape)}, expected {shape}")
            setattr(self, name, value)

    def add(self, m: Measurement, fingerprint: str) -> None:
        self.key_sum += m.key_redundancy.double()
        self.value_sum += m.value_redundancy.double()
        self.prompts += 1
        if m.hits is not None:
            self.answered += 1
            self.hits_sum += m.hits.double()
            if m.retrieval is not None:
                self.retrieval_sum += m.retrieval.double()
            self.steps += m.steps
        self.done.append(fingerprint)

    def to_profile(self, model: str, data: dict, library_version: str) -> Profile:
        if self.prompts == 0:
            raise ValueError("no calibration prompt was measured")
        data = dict(data, prompts=self.prompts, prompts_with_answer=self.answered, counted_steps=self.steps)
        head_scores = (self.hits_sum / self.steps).float() if self.steps > 0 else None
        retrieval = (self.retrieval_sum / self.steps).float() if self.steps > 0 else None
        return Profile(model=model, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                       key_redundancy=(self.key_sum / self.prompts).float(),
                       value_redundancy=(self.value_sum / self.prompts).float(),
                       head_scores=head_scores, retrieval_scores=retrieval, data=data,
                       library_version=library_version)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "key_sum": self.key_sum.tolist(), "value_sum": self.value_sum.tolist(),
                "hits_sum": self.hits_sum.tolist(), "retrieval_sum": self.retrieval_sum.tolist(),
                "prompts": self.prompts, "steps": self.steps,
                "answered": self.answered, "done": self.done}

    @classmethod
    def from_json(cls, obj: dict) -> Accumulator:
        """Read a saved state, refusing one whose counts and sums cannot come from a real run."""
        if "retrieval_sum" not in obj and int(obj["steps"]) != 0:
            raise ValueError("it was written by an older mixkv without HeadKV retrieval sums, so its counted steps "
                             "would be missing from retrieval_scores")
        state = cls(int(obj["num_layers"]), int(obj["num_kv_heads"]), key_sum=obj["key_sum"],
                    value_sum=obj["value_sum"], hits_sum=obj["hits_sum"], retrieval_sum=obj.get("retrieval_sum"),
                    prompts=int(obj["prompts"]), steps=int(obj["steps"]), answered=int(obj["answered"]),
                    done=[str(d) for d in obj["done"]])
        state.check()
        return state

    def check(self) -> None:
        """Each prompt adds a redundancy in [0, 1] per head, each counted step a hit rate and a mass in [0, 1]."""
        if self.prompts < 0 or self.prompts != len(self.done):
            raise ValueError(f"{self.prompts} prompts but {len(self.done)} fingerprints")
        if not 0 <= self.answered <= self.prompts or self.steps < 0:
            raise ValueError(f"inconsistent counts (prompts {self.prompts}, answered {self.answered}, "
                             f"steps {self.steps})")
        for name, limit in (("key_sum", self.prompts), ("value_sum", self.prompts), ("hits_sum", self.steps),
                            ("retrieval_sum", self.steps)):
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()) or bool((t < -1e-6).any()) or bool((t > limit + 1e-6).any()):
                raise ValueError(f"{name} holds values outside [0, {limit}]")
