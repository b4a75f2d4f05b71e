"""The ``mixkv`` command (:mod:`mixkv.cli.main`), one module per subcommand: ``demo``, ``eval``
(``eval_cmd``), ``calibrate``, ``analyze``, ``compare``, ``bench`` and ``capacity``."""
