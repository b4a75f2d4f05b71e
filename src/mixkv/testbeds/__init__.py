"""Test beds: models and data for the lab, all available offline.

* :mod:`~mixkv.testbeds.smollm2`: SmolLM2-135M-Instruct from a PyPI wheel;
* :mod:`~mixkv.testbeds.tasks`: procedurally generated long-context text tasks;
* :mod:`~mixkv.testbeds.toyvlm`: our trained toy VLM and its image/question generator;
* :mod:`~mixkv.testbeds.sources`: model names -> loaded models (the one place that dispatches).

Testbeds use the core when they must, never the lab.
"""
