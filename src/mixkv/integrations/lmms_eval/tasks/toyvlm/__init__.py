"""The toy VLM task for lmms-eval: YAMLs and the functions they name (see :mod:`.utils`)."""
