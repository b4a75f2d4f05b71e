"""Experiments on top of the core: evaluation, benchmarks, calibration, analysis, the kvpress
comparison, and the figures and tables that report them.

Where things go: a new experiment is one module here (its maths as pure functions, its run loop
using :mod:`mixkv.lab.run`), its figures in :mod:`mixkv.lab.figures` (or a ``*_figures`` module
of its own when they are many), its tables in :mod:`mixkv.lab.report`, and its command in
:mod:`mixkv.cli`. The lab imports the core and the testbeds; nothing in the core imports the lab.
"""
