"""mixkv as a plugin of the real, unforked lmms-eval (PyPI ``lmms-eval`` 0.7.x); issue #15.

Run any supported lmms-eval model under a mixkv method with lmms-eval's own command line::

    lmms-eval --model mixkv_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=snapkv+mixkv,budget=64 \\
        --tasks docvqa_val,chartqa --batch_size 1 --log_samples --output_path out/lmms

Parts (only :mod:`.args`, :mod:`.recorder`, :mod:`.manifests`, :mod:`.export` and the task's ``utils`` import
without lmms-eval; the rest is imported by lmms-eval itself):

* :mod:`.manifests`: the entry point of group ``lmms_eval.models`` -- ``mixkv_<id>`` for each supported
  lmms-eval model id, plus ``toy_vlm`` / ``mixkv_toy_vlm`` (our toy VLM, offline on CPU);
* :mod:`.wrapped` / :mod:`.wrapper`: the twin classes -- lmms-eval's class with its ``generate_until`` run
  inside ``mixkv.press``; per-sample ``kv_bytes``, ``kv_bytes_full``, ``compress_ms`` land in the logged
  samples' ``token_counts``;
* :mod:`.args`: mixkv's ``--model_args`` (``method``, ``budget`` or ``ratio``, ``window``, ``profile``,
  ``redundancy``) checked before any model loads;
* :mod:`.recorder`: per-row KV bytes and compression time of each prefill;
* :mod:`.export` and ``tasks/toyvlm/``: the toy VLM's ``mixkv eval`` samples as local files and an lmms-eval task
  with the same prompt and scorer; :mod:`.toyvlm_model`: the toy VLM as an lmms-eval model.

lmms-eval pulls a CUDA torch (~7 GB): it lives in its own venv (``make lmms-env``, ``scripts/lmms_env.sh``),
never in mixkv's default install; ``make lmms-check`` (``scripts/lmms_check.py``) checks on CPU that
lmms-eval and ``mixkv eval`` agree sample by sample on the toy VLM.
"""
