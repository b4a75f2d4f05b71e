"""The compression core: maths, budgets, methods, cache, attention and the press.

Nothing here imports from :mod:`mixkv.lab`, :mod:`mixkv.cli` or :mod:`mixkv.testbeds`
(``tests/test_layout.py`` checks it). Data flows one way inside the core:
``press`` -> ``methods`` -> ``budgets`` / ``scores``; ``press`` uses ``cache``, ``attention``, ``models``.

Where things go:

* a new per-token score or allocation rule: a pure function in ``scores.py`` / ``budgets.py``;
* a new method: one file in ``methods/`` with a dataclass subclassing
  :class:`~mixkv.core.methods.base.BudgetedMethod` (a base) or
  :class:`~mixkv.core.methods.base.ScoreWrapper` (a wrapper such as MixKV), registered by name
  in ``registry.py``;
* a new architecture: its facts in ``models.py``.
"""
