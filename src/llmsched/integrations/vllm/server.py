"""vLLM's OpenAI server as a child process: started, waited for, stopped with its engine.

`vllm serve` is `python -m vllm.entrypoints.openai.api_server` here: the console script of the
CPU build looks for a distribution named "vllm" and fails, its module does not. The server runs
in its own process group, so that stopping it also stops vLLM's engine core and workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from llmsched.integrations.process import ServerProcess, free_port

__all__ = ["VllmServer", "free_port"]


class VllmServer(ServerProcess):
    """``with VllmServer(model_folder, ["--max-num-seqs", "8", ...]) as server: server.url``.

    `args` are `vllm serve`'s flags after the model; the server's output goes to `log`."""

    name = "vLLM's server"

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
        argv = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *args]
        super().__init__(argv, log=log, env=env, port=port, ready_timeout=ready_timeout)
