"""An HTTP server as a child process: started, waited for on /health, stopped or killed with
everything it started (vLLM's engine core, its workers). Used by tests and benchmarks for vLLM's
server and llmsched's own (`llmsched serve engine|gateway`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(argv, log=...) as server: server.url``. `argv` runs with this
    Python (``-m module ...``) and must take `--port`, which is added."""

    name = "the server"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 300.0,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log)
        self.command = [sys.executable, *argv, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a+")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: what it starts dies with it
        )
        deadline = time.monotonic() + self.ready_timeout
        while not self.healthy():
            if self.process.poll() is not None:
                self._log.seek(0)
                tail = self._log.read()[-3000:]
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was "
                    f"ready; the end of {self.log_path}:\n{tail}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not answer /health within {self.ready_timeout:g} s "
                    f"(log: {self.log_path})"
                )
            time.sleep(0.2)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, connections dropped."""
        self._signal(signal.SIGKILL)
        self._reap(10)

    def stop(self) -> None:
        """SIGTERM to the process group (vLLM shuts its engine down), SIGKILL if it is still
        there after 30 s."""
        self._signal(signal.SIGTERM)
        self._reap(30)

    def _signal(self, sig: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def _reap(self, timeout: float) -> None:
        process = self.process
        if process is None:
            return
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        self._log.close()
        self.process = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
