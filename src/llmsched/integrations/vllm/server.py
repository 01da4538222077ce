"""vLLM's OpenAI server as a child process: started, waited for, stopped with its engine.

`vllm serve` is `python -m vllm.entrypoints.openai.api_server` here: the console script of the
CPU build looks for a distribution named "vllm" and fails, its module does not. The server runs
in its own process group, so that stopping it also stops vLLM's engine core and workers.
"""

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


class VllmServer:
    """``with VllmServer(model_folder, ["--max-num-seqs", "8", ...]) as server: server.url``.

    `args` are `vllm serve`'s flags after the model; the server's output goes to `log`."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        log: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 300.0,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log)
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--port", str(self.port), *args,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w+")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: the engine core dies with it
        )
        deadline = time.monotonic() + self.ready_timeout
        while not self.healthy():
            if self.process.poll() is not None:
                self._log.seek(0)
                tail = self._log.read()[-3000:]
                raise RuntimeError(
                    f"vLLM's server exited with {self.process.returncode} before it was "
                    f"ready; the end of {self.log_path}:\n{tail}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"vLLM's server did not answer /health within {self.ready_timeout:g} s "
                    f"(log: {self.log_path})"
                )
            time.sleep(1)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM to the server's process group (vLLM shuts its engine down), SIGKILL if
        it is still there after 30 s."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(process.pid), signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        self._log.close()
        self.process = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
