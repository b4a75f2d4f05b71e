"""The ``mixkv`` command: demo, eval, bench."""
