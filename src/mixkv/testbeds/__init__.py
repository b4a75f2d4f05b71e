"""Test beds: a small real model (SmolLM2-135M-Instruct) and procedurally generated long-context tasks.

They exist so the KV-cache compression methods can be checked end to end on a real trained model, on
CPU, without any model-hub or data-set download.
"""
