"""Every step of a real vLLM engine, recorded to a file: what the latency model is fitted on.

Opt-in with ``--additional-config '{"llmsched": {"step_log": "steps.jsonl"}}'`` on any of
llmsched's scheduler classes, or on :class:`RecordingScheduler` (vLLM's own scheduler, only
recording). Off, it costs one attribute test per call.

The file is JSON lines (read by :func:`llmsched.hardware.steplog.read_step_log`). The first
line is the header: the engine's limits (KV blocks, block size, token budget, sequences), the
model's shape (its ``config.json`` fields), the device, vLLM's version and the scheduler class.
Then one line per step that ran tokens::

    {"t": [t0, t1, t2, t3],        # schedule() entered, returned; update_from_output() entered,
                                   # returned (seconds on the header's clock)
     "p": [[c, cached], ...],      # prefill (or recompute) chunks: tokens, KV already cached
     "d": [cached, ...],           # decodes: KV tokens already cached
     "kv": used, "run": n, "wait": n, "pre": n, "fin": n, "busy": bool,
     "first": [request id, ...]}  # requests whose first token this step made

and, when a request reaches the scheduler, ``{"add": request id, "t": seconds, "arrived":
seconds}`` (``arrived``: when vLLM's API server received it, its ``arrival_time``).

``t2 − t1`` is the model's forward pass and sampling (with synchronous scheduling; under async
scheduling the steps overlap and only the ``t0`` of consecutive steps tell the cycle). ``busy``
says the engine still had requests after the step, so the next step's ``t0`` follows without
waiting for work: ``t0[next] − t0`` is then the whole engine cycle of this step, the time the
simulator charges for it. A batch here is the :data:`llmsched.hardware.replay.Batch` the
simulator's own replay uses, so the two sides price the same thing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from llmsched.hardware.steplog import STEP_LOG_VERSION, cpu_description

_MODEL_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "torch_dtype",
)


def _device_description(vllm_config) -> dict[str, Any]:
    device = str(getattr(vllm_config.device_config, "device_type", "") or "")
    if device in ("", "cpu"):
        return cpu_description(
            str(vllm_config.model_config.dtype).removeprefix("torch."),
            vllm_config.parallel_config.tensor_parallel_size,
        )
    out: dict[str, Any] = {"kind": device}
    try:
        import torch

        if torch.cuda.is_available():
            out["name"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def header(scheduler) -> dict[str, Any]:
    """The first line of a step log: what the engine is."""
    import vllm

    cfg = scheduler.vllm_config
    hf = cfg.model_config.hf_config.to_dict()
    sc = scheduler.scheduler_config
    return {
        "llmsched_step_log": STEP_LOG_VERSION,
        "vllm": vllm.__version__,
        "scheduler": type(scheduler).__name__,
        "async_scheduling": bool(sc.async_scheduling),
        "model": cfg.model_config.model,
        "model_config": {k: hf[k] for k in _MODEL_FIELDS if k in hf},
        "dtype": str(cfg.model_config.dtype).removeprefix("torch."),
        "tensor_parallel_size": cfg.parallel_config.tensor_parallel_size,
        "device": _device_description(cfg),
        "num_blocks": scheduler.kv_cache_config.num_blocks,
        "block_size": scheduler.block_size,
        "max_num_batched_tokens": scheduler.max_num_scheduled_tokens,
        "max_num_seqs": scheduler.max_num_active_reqs,
        "max_model_len": scheduler.max_model_len,
        "enable_prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
        # Step times are seconds since the log opened: at `wall_time`, and at `monotonic` on
        # this machine's monotonic clock (time.perf_counter: comparable across its processes,
        # e.g. with a load client's start times).
        "wall_time": time.time(),
        "monotonic": time.perf_counter(),
    }


class StepLog:
    """Writes a step log (the module's docstring says what a line holds)."""

    def __init__(self, path: str | os.PathLike[str], scheduler) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", buffering=1)  # a line at a time: a killed engine
        # leaves every step it finished
        head = header(scheduler)
        self._origin, self._wall = head["monotonic"], head["wall_time"]
        self._file.write(json.dumps(head) + "\n")
        self._pending: dict[int, dict[str, Any]] = {}  # id(scheduler output) -> its step
        self.steps = 0

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def scheduled(self, scheduler, output, t0: float) -> None:
        """After schedule(): the batch, from the requests' state once vLLM advanced them."""
        t1 = self.now()
        if not output.total_num_scheduled_tokens:
            return
        requests = scheduler.requests
        prefills, decodes, sampling = [], [], []
        for rid, n in output.num_scheduled_tokens.items():
            req = requests[rid]
            cached = req.num_computed_tokens - n  # vLLM advanced it in schedule()
            prompt = req.num_prompt_tokens
            # One token past the prompt is a decode (under async scheduling the token before
            # it may still be in flight, so num_output_tokens cannot tell).
            if n == 1 and cached >= prompt:
                decodes.append(cached)
            else:
                prefills.append([n, cached])
                if cached < prompt <= cached + n and not req.num_output_tokens:
                    sampling.append(req)  # completes its prompt: its first token comes now
        pool = scheduler.kv_cache_manager.block_pool
        self._pending[id(output)] = {
            "t": [round(t0, 6), round(t1, 6)],
            "p": prefills,
            "d": decodes,
            "kv": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),  # less the null block
            "run": len(scheduler.running),
            "wait": len(scheduler.waiting),
            "pre": len(output.preempted_req_ids or ()),
            "sampling": sampling,
        }

    def updated(self, scheduler, output, t2: float, known_before: int) -> None:
        """After update_from_output(): the step's end, how many requests it finished (they
        left vLLM's table), and whether work is left."""
        step = self._pending.pop(id(output), None)
        if step is None:
            return
        step["t"] += [round(t2, 6), round(self.now(), 6)]
        step["first"] = [r.request_id for r in step.pop("sampling") if r.num_output_tokens]
        step["fin"] = known_before - len(scheduler.requests)
        step["busy"] = scheduler.has_unfinished_requests()
        self._file.write(json.dumps(step, separators=(",", ":")) + "\n")
        self.steps += 1

    def added(self, request) -> None:
        """A request reached the scheduler (`t`), having arrived at vLLM's API server at
        `arrived` (its `arrival_time`, on the same clock): with the step that makes its first
        token (`first`), what the serving stack adds outside the engine can be measured."""
        arrived = request.arrival_time - self._wall
        line = {"add": request.request_id, "t": round(self.now(), 6), "arrived": round(arrived, 6)}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class StepRecordingMixin:
    """Mixed in before a vLLM scheduler class: records its steps when the settings name a
    ``step_log`` file (llmsched's classes have it; :class:`RecordingScheduler` is vLLM's own
    scheduler with only this)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from llmsched.integrations.vllm.settings import Settings

        settings = getattr(self, "settings", None)
        if settings is None:  # vLLM's own scheduler: only the recording is llmsched's
            settings = Settings.from_additional_config(self.vllm_config.additional_config)
            if settings.policy or settings.params:
                raise ValueError(
                    f"{type(self).__name__} runs vLLM's own scheduler and only records its "
                    "steps: to choose an llmsched policy use "
                    "llmsched.integrations.vllm.LlmschedScheduler"
                )
        self.step_log = StepLog(settings.step_log, self) if settings.step_log else None

    def schedule(self, *args, **kwargs):
        log = self.step_log
        if log is None:
            return super().schedule(*args, **kwargs)
        t0 = log.now()
        output = super().schedule(*args, **kwargs)
        log.scheduled(self, output, t0)
        return output

    def add_request(self, request) -> None:
        super().add_request(request)
        if self.step_log is not None:
            self.step_log.added(request)

    def update_from_output(self, scheduler_output, model_runner_output):
        log = self.step_log
        if log is None:
            return super().update_from_output(scheduler_output, model_runner_output)
        t2, known = log.now(), len(self.requests)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        log.updated(self, scheduler_output, t2, known)
        return outputs

    def shutdown(self) -> None:
        super().shutdown()
        if self.step_log is not None:
            self.step_log.close()
