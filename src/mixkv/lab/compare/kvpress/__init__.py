"""Files run inside kvpress's own venv, shipped as package data: ``setup_env.sh`` builds the venv,
``run_kvpress.py`` measures kvpress on the exported prompts.

Nothing here is imported by mixkv: :mod:`mixkv.lab.compare.kvpress_side` finds the files with
:mod:`importlib.resources` and runs them (``run_kvpress.py`` cannot import mixkv, whose
transformers is newer than kvpress allows).
"""
