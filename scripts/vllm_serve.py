"""`vllm serve` as a child process for `make vllm-check` part serve-http: start, wait, talk HTTP, always stop.

Why a separate module: the check must exercise the command users type (the `vllm` console script, whose
version lookup needs the `vllm` alias that scripts/vllm_env.sh installs) through the real OpenAI-compatible
server, and a server left behind would hold the cores and a port. So the server listens on 127.0.0.1 on a
port that was free a moment before, gets a bounded time to answer ``/health``, runs in its own process
group (vLLM's engine core and workers are its children), and the whole group is stopped on every exit path.
Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on just now (the server may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class ServerError(RuntimeError):
    """The server did not start, died, or a request failed; the message ends with the server's log tail."""


class Server:
    """``with Server(cmd, env, log) as s:`` starts ``cmd`` (which must bind :data:`HOST`), waits until
    ``/health`` answers 200 (at most ``start_timeout`` seconds) and stops its process group on exit."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int, start_timeout: float) -> None:
        self.cmd, self.env, self.log, self.port, self.start_timeout = cmd, env, log, port, start_timeout
        self.proc: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def fail(self, what: str) -> ServerError:
        return ServerError(f"{what}; server command: {' '.join(self.cmd)}\nlog {self.log} (last lines):\n"
                           f"{log_tail(self.log)}")

    def __enter__(self) -> Server:
        started = time.perf_counter()
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, started: float) -> None:
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self.fail(f"`vllm serve` exited with code {code} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.perf_counter() - started > self.start_timeout:
                raise self.fail(f"`vllm serve` did not answer {self.url}/health within {self.start_timeout:.0f} s")
            time.sleep(1.0)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; waits (bounded) until it is gone."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if not _group_alive(pgid):
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                self.proc.poll()  # reap the leader, or it stays a zombie of this process
                time.sleep(0.2)
        self.proc.wait(timeout=10)
        self.proc = None

    def post(self, path: str, body: dict, timeout: float) -> dict:
        """POST JSON, return the decoded reply; a non-200 reply or a dead server raises :class:`ServerError`."""
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise self.fail(f"POST {path} answered {e.code}: {e.read()[:500]!r}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise self.fail(f"POST {path} failed: {e}") from None
