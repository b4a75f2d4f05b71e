"""A whole calibration run, with partial progress that survives an interruption.

The profile at ``out`` is written once, atomically, when every prompt is done. Progress goes to
``<out>.partial.json`` every ``save_every`` prompts and when the run is interrupted (any
exception, Ctrl-C included); ``resume=True`` continues from it (it must describe the same model,
data and settings, and its prompts are checked by fingerprint). Without ``resume`` an existing
partial file is an error, so progress is never thrown away silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ...core.io import write_json_atomic
from ...core.models import inspect_model
from ...core.profiles import Profile, save_profile
from .accumulator import Accumulator
from .measuring import measure
from .sample import CalibrationSample

PARTIAL_FORMAT = "mixkv-calibration-partial"


def partial_path(out: str | Path) -> Path:
    return Path(str(out) + ".partial.json")


def _load_partial(path: Path, model_id: str, info, spec: dict) -> Accumulator:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); delete it to start over") from e
    if not isinstance(obj, dict) or obj.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{path}: not a mixkv partial calibration file; delete it to start over")
    if obj.get("model") != model_id or obj.get("spec") != spec:
        raise ValueError(
            f"{path} was made for model {obj.get('model')!r} with settings {obj.get('spec')}; this run is "
            f"{model_id!r} with {spec}. Delete it or rerun with the same settings."
        )
    try:
        state = Accumulator.from_json(obj["state"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to start over") from e
    if (state.num_layers, state.num_kv_heads) != (info.num_layers, info.num_kv_heads):
        raise ValueError(f"{path}: layer/head shape does not match the model")
    return state


def calibrate(model, samples: Sequence[CalibrationSample], out: str | Path, *, model_id: str | None = None,
              data: dict | None = None, decode: Callable[[list[int]], str] | None = None,
              max_new_tokens: int = 16, eos_token_ids: set[int] | None = None, hits_on: str = "answer",
              resume: bool = False, save_every: int = 4, progress: bool = True) -> Profile:
    """Measure every sample, then write the profile to ``out`` (atomically) and return it.

    ``data`` describes the calibration data (stored in the profile). See the module docstring for
    the partial file and ``resume``.
    """
    from ... import __version__

    info = inspect_model(model)
    model_id = model_id or info.name
    out = Path(out)
    partial = partial_path(out)
    spec = {"data": data or {}, "max_new_tokens": max_new_tokens, "hits_on": hits_on, "n": len(samples)}
    if partial.exists() and not resume:
        raise ValueError(f"{partial} holds an interrupted calibration; pass --resume (resume=True) to continue "
                         "it, or delete it to start over")
    state = _load_partial(partial, model_id, info, spec) if partial.exists() else \
        Accumulator(info.num_layers, info.num_kv_heads)
    if state.prompts > len(samples):
        raise ValueError(f"{partial} already holds {state.prompts} prompts, more than the {len(samples)} asked for")

    def save() -> None:
        write_json_atomic({"format": PARTIAL_FORMAT, "model": model_id, "spec": spec, "state": state.to_json()},
                          partial, indent=None)

    unsaved = 0
    bar = tqdm(total=len(samples), initial=state.prompts, desc="calibrate", unit="prompt", disable=not progress)
    try:
        for i, sample in enumerate(samples):
            fp = sample.fingerprint()
            if i < state.prompts:
                if state.done[i] != fp:
                    raise ValueError(f"{partial}: prompt {i} differs from the one measured before; "
                                     "the data changed since the interrupted run (delete the partial file)")
                continue
            m = measure(model, sample, decode, max_new_tokens, eos_token_ids, hits_on)
            state.add(m, fp)
            unsaved += 1
            bar.update(1)
            if unsaved >= save_every:
                save()
                unsaved = 0
    except BaseException:
        if unsaved:
            save()
        raise
    finally:
        bar.close()
    profile = state.to_profile(model_id, dict(spec["data"], max_new_tokens=max_new_tokens, hits_on=hits_on),
                               __version__)
    save_profile(profile, out)
    partial.unlink(missing_ok=True)
    return profile
