"""vLLM's scheduler without a model, and llmsched's simulated engine, on one scripted workload.

As vLLM's own scheduler tests do: a `VllmConfig` for a model folder that holds only a
`config.json`, a KV cache of a chosen number of blocks, and model outputs made here (one sampled
token per request that completes its prompt or decodes; `</think>` at the position each request
asks for). Time is a clock that advances by a fixed step time per step that runs tokens, in
vLLM and in the simulator alike, so arrivals land at the same step on both sides and the two
step sequences can be compared one to one. Used by the differential tests and by
benchmarks/vllm_scheduling.py.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request as VllmRequest
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
from vllm.v1.structured_output import StructuredOutputManager

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.policies import policy_class, router_class
from llmsched.workload.request import Request, Workload

# A Llama shape small enough for a CPU (vLLM loads it with random weights: load_format="dummy").
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
THINK_END = 31999  # the token id the harness emits as `</think>`
TOKEN = 7  # every other sampled token


def model_folder(path: str | Path, config: dict = TINY_LLAMA) -> Path:
    """A model folder vLLM can load without weights: only its config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_tokenizer(folder: str | Path, words: Sequence[str] = ()) -> dict[str, int]:
    """A word-level tokenizer saved in a model folder, for the model's whole vocabulary: token
    i is the word "t{i}", except that `words` take the ids from 100 on (returned). Built
    offline with the `tokenizers` package; vLLM's OpenAI server needs one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size = TINY_LLAMA["vocab_size"]
    names = [f"t{i}" for i in range(size)]
    names[0] = "<unk>"
    ids = {word: 100 + k for k, word in enumerate(words)}
    for word, i in ids.items():
        names[i] = word
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="t1", eos_token="t2"
    )
    fast.save_pretrained(str(folder))
    return ids


def vllm_config(
    model: str | Path,
    *,
    num_blocks: int,
    block_size: int = 16,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 2048,
    policy: str = "fcfs",
    long_prefill_token_threshold: int = 0,
    watermark: float = 0.0,
    enable_prefix_caching: bool = False,
    additional_config: dict | None = None,
) -> VllmConfig:
    """vLLM's configuration of one engine with `num_blocks` KV blocks (one of them vLLM's
    null block, so `num_blocks - 1` hold tokens)."""
    model_config = ModelConfig(
        model=str(model), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_model_len
    )
    scheduler = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=True,
        policy=policy,
        long_prefill_token_threshold=long_prefill_token_threshold,
        watermark=watermark,
    )
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    cache.num_gpu_blocks = num_blocks
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler,
        cache_config=cache,
        additional_config=additional_config or {},
    )


def make_scheduler(config: VllmConfig, cls: type = Scheduler):
    """A scheduler of class `cls` over the config's KV blocks, constructed as vLLM's engine
    core constructs it (keywords only)."""
    cache = config.cache_config
    spec = FullAttentionSpec(
        block_size=cache.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32
    )
    kv = KVCacheConfig(
        num_blocks=cache.num_gpu_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layers"], spec)],
    )
    return cls(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=cache.block_size,
        log_stats=False,
    )


def request_args(r: Request) -> dict:
    """A workload request's llmsched data as vllm_xargs."""
    args = {}
    if r.score is not None:
        args["score"] = r.score
    if r.tier is not None:
        args["tier"] = r.tier
    if r.tpot_slo is not None:
        args["tbt"] = r.tpot_slo
    if r.reasoning_tokens:
        args["reasoning"] = True
    return args


def prompt_token_ids(r: Request) -> list[int]:
    """`prompt_tokens` token ids made from the request's runs: the same for two requests where
    their runs agree (a shared prefix), distinct elsewhere (its own tokens)."""
    ids: list[int] = []
    for key, n in r.runs:
        if key == ("in", r.request_id):
            seed = zlib.crc32(r.request_id.encode()) % 20000
            ids += [(seed + i) % 30000 + 10 for i in range(n)]
        else:
            ids += [zlib.crc32(f"{key!r}:{i}".encode()) % 30000 + 10 for i in range(n)]
    return ids


def vllm_request(r: Request, block_hasher=None) -> VllmRequest:
    """The vLLM request for a workload request: `prompt_tokens` token ids (made from its runs,
    so only a prefix is shared), exactly `output_tokens` to generate."""
    prompt = prompt_token_ids(r)
    params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True, extra_args=request_args(r))
    return VllmRequest(
        r.request_id,
        prompt,
        params,
        None,
        arrival_time=r.arrival,
        priority=r.priority,
        block_hasher=block_hasher,
    )


def block_hasher(config: VllmConfig):
    """vLLM's prefix-cache block hasher, as its engine core makes it (None: caching off)."""
    cache = config.cache_config
    if not cache.enable_prefix_caching:
        return None
    hash_fn = get_hash_fn_by_name(cache.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(cache.block_size, hash_fn)


@dataclass(frozen=True)
class Step:
    """One scheduling step: when it was planned, the tokens each request got, who was
    preempted (a step that only preempts has no tokens and takes no time)."""

    time: float
    tokens: dict[str, int]
    preempted: frozenset[str] = frozenset()


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    finish: dict[str, float] = field(default_factory=dict)  # request id -> time


def drive(
    scheduler,
    requests: Sequence[Request],
    *,
    step_time: float = 1.0,
    overlap: bool = False,
    max_steps: int = 1_000_000,
) -> Trace:
    """Serve `requests` through a vLLM scheduler step by step, with made-up model outputs.
    With `overlap` (async scheduling, as vLLM's engine core runs an AsyncScheduler) each step
    is scheduled before the previous step's output is processed."""
    pending = sorted(requests, key=lambda r: r.arrival)
    reasoning = {r.request_id: r.reasoning_tokens for r in pending}
    now = 0.0
    if hasattr(scheduler, "clock"):  # llmsched's classes read time from here
        scheduler.clock = lambda: now
    trace = Trace()
    hasher = block_hasher(scheduler.vllm_config)
    in_flight: list[tuple] = []  # (scheduler output, model output) not yet processed

    def process() -> None:
        output, runner = in_flight.pop(0)
        for outputs in scheduler.update_from_output(output, runner).values():
            for out in outputs.outputs:
                if out.finish_reason is not None:
                    trace.finish[out.request_id] = now

    i = 0
    for _ in range(max_steps):
        while i < len(pending) and pending[i].arrival <= now:
            scheduler.add_request(vllm_request(pending[i], hasher))
            i += 1
        if not scheduler.has_unfinished_requests():
            if in_flight:
                process()
                continue
            if i == len(pending):
                return trace
            now = pending[i].arrival
            continue
        output = scheduler.schedule()
        tokens = dict(output.num_scheduled_tokens)
        trace.steps.append(Step(now, tokens, frozenset(output.preempted_req_ids)))
        if not tokens and not output.preempted_req_ids and not in_flight:
            raise RuntimeError(f"vLLM scheduled nothing at t={now} with requests unfinished")
        sampled = []
        for rid in tokens:
            request = scheduler.requests[rid]
            # The token a step samples sits at the position its computed tokens reach.
            index = request.num_computed_tokens - request.num_prompt_tokens
            sampled.append(
                []
                if request.is_prefill_chunk
                else [THINK_END if index + 1 == reasoning[rid] else TOKEN]
            )
        if tokens:
            now += step_time
        in_flight.append(
            (
                output,
                ModelRunnerOutput(
                    req_ids=list(tokens),
                    req_id_to_index={rid: k for k, rid in enumerate(tokens)},
                    sampled_token_ids=sampled,
                ),
            )
        )
        if len(in_flight) > overlap:
            process()
    raise RuntimeError(f"not done after {max_steps} steps")


class FixedStep:
    """A latency model in which every iteration takes the same time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def iteration_time(self, shape) -> float:
        return self.seconds

    def decode_iteration_times(self, num_decodes: int, kv_tokens: int, k: int) -> np.ndarray:
        return np.full(k, self.seconds)


def simulate(
    requests: Sequence[Request],
    policy: str,
    engine: EngineConfig,
    *,
    params: dict | None = None,
    step_time: float = 1.0,
) -> Trace:
    """The same workload through llmsched's simulated engine, one iteration per step."""
    trace = Trace()
    cls = policy_class(policy)

    def observe(inst, span) -> None:
        trace.steps.append(
            Step(
                inst.now,
                {s.request_id: t for s, t in span.plan.items},
                frozenset(v.request_id for v, _ in span.plan.preempted),
            )
        )

    class Recording(Cluster):
        def on_finish(self, state, instance, t):
            trace.finish[state.request_id] = t
            super().on_finish(state, instance, t)

    cluster = Recording(
        1,
        engine,
        lambda: cls(preemption="recompute", **(params or {})),
        router_class("round-robin")(),
        FixedStep(step_time),
        observer=observe,
        fast_forward=False,
    )
    cluster.run(Workload.from_requests(list(requests)))
    return trace


def engine_config_of(config: VllmConfig, **overrides) -> EngineConfig:
    """llmsched's engine settings equal to a harness VllmConfig's."""
    sc, cache = config.scheduler_config, config.cache_config
    return EngineConfig(
        **{
            "num_blocks": cache.num_gpu_blocks - 1,
            "block_size": cache.block_size,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "max_num_seqs": sc.max_num_seqs,
            "max_model_len": config.model_config.max_model_len,
            "long_prefill_token_threshold": sc.long_prefill_token_threshold,
            "watermark": sc.watermark,
            "enable_prefix_caching": cache.enable_prefix_caching,
            **overrides,
        }
    )


class ThinkAt(AdapterLogitsProcessor):
    """A logits processor that makes a request's `think_at`-th output token (its vllm_xargs)
    the `</think>` token, and never any other: a model with random weights never ends its
    reasoning by itself. Load it with `LLM(..., logits_processors=[ThinkAt])`."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        at = (params.extra_args or {}).get("think_at")

        def think_at(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if len(output_ids) + 1 == at:
                logits.fill_(-math.inf)
                logits[THINK_END] = 0.0
            else:
                logits[THINK_END] = -math.inf
            return logits

        return think_at
