"""The emulated engine's /metrics, in vLLM 0.32's names, labels and histogram buckets
(`vllm/v1/metrics/loggers.py`, `buckets.py`), so that a gateway, a dashboard or llm-d's
scorers read it as they read vLLM. Times are the simulated engine's seconds (the wall clock's
when `--time-scale` is 1). The prefix-cache counters count queries; their hits stay 0 until the
simulator has a prefix cache (the agents issue).
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily

from llmsched.engine.state import RequestState

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
TTFT_BUCKETS += (5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
ITL_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
LATENCY_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> list[int]:
    """vLLM's 1-2-5 buckets up to the context length (`build_1_2_5_buckets`)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_model_len:
                return out
            out.append(value)
        exponent += 1


disable_created_metrics()  # vLLM does too: no `_created` series


class EngineMetrics:
    """One engine's metrics in its own registry (several engines may share a process)."""

    def __init__(self, engine, model_name: str, max_model_len: int, config) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.labels = (model_name, "0")

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, labels, registry=r).labels(*self.labels).set_function(read)

        gauge("vllm:num_requests_running", "Requests in model execution batches.",
              lambda: engine.num_running)  # fmt: skip
        gauge("vllm:num_requests_waiting", "Requests waiting to be processed.",
              lambda: engine.num_waiting)  # fmt: skip
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              lambda: engine.kv_usage)  # fmt: skip
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"],
            registry=r,
        )
        caching = str(engine.prefix_cache_counts is not None)
        info.labels(str(config.block_size), str(config.num_blocks), caching, "0").set(1)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=r)

        def values(c: Counter):
            return c.labels(*self.labels)

        self.prompt_tokens = values(counter("vllm:prompt_tokens", "Prefill tokens processed."))
        self.generation_tokens = values(
            counter("vllm:generation_tokens", "Generation tokens processed.")
        )
        r.register(_PrefixCacheCounters(engine, labels, self.labels))
        self.preemptions = values(counter("vllm:num_preemptions", "Cumulative preemptions."))
        self.success = counter(
            "vllm:request_success", "Successfully processed requests.", ("finished_reason",)
        )

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*self.labels)

        tokens = token_buckets(max_model_len)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "TTFT, s.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency, s.",
                             ITL_BUCKETS)  # fmt: skip
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds", "Time per output token, s.", ITL_BUCKETS
        )
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "E2E latency, s.",
                             LATENCY_BUCKETS)  # fmt: skip
        self.queue = histogram("vllm:request_queue_time_seconds", "Time in WAITING, s.",
                               LATENCY_BUCKETS)  # fmt: skip
        self.prefill = histogram("vllm:request_prefill_time_seconds", "Prefill phase, s.",
                                 LATENCY_BUCKETS)  # fmt: skip
        self.decode = histogram("vllm:request_decode_time_seconds", "Decode phase, s.",
                                LATENCY_BUCKETS)  # fmt: skip
        self.inference = histogram("vllm:request_inference_time_seconds", "RUNNING phase, s.",
                                   LATENCY_BUCKETS)  # fmt: skip
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Prompt tokens.", tokens)
        self.request_generation = histogram(
            "vllm:request_generation_tokens", "Generation tokens.", tokens
        )

    def arrived(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, state: RequestState, times: np.ndarray, reason: str) -> None:
        """A request ended; `times` are its tokens' simulated times (this response's)."""
        self.success.labels(*self.labels, reason).inc()
        self.preemptions.inc(state.preemptions)
        self.request_prompt.observe(state.prompt_tokens)
        self.request_generation.observe(len(times))
        if not len(times):
            return
        first, last, start = float(times[0]), float(times[-1]), state.first_scheduled
        self.ttft.observe(first - state.arrival)
        for gap in np.diff(times):
            self.itl.observe(float(gap))
        if len(times) > 1:
            self.tpot.observe((last - first) / (len(times) - 1))
        self.e2e.observe(last - state.arrival)
        self.queue.observe(start - state.arrival)
        self.prefill.observe(first - start)
        self.decode.observe(last - first)
        self.inference.observe(last - start)


class _PrefixCacheCounters:
    """vLLM's prefix-cache counters, read from the engine's block pools when scraped: queries
    and hits in tokens, counted at every admission lookup (re-admissions after a preemption
    too), as vLLM's `record_prefix_cache_stats`. Absent with the cache off, as in vLLM."""

    def __init__(self, engine, label_names: list[str], labels: tuple[str, ...]) -> None:
        self.engine, self.label_names, self.labels = engine, label_names, labels

    def collect(self):
        counts = self.engine.prefix_cache_counts
        if counts is None:
            return
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", counts[0]),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", counts[1]),
        ):
            family = CounterMetricFamily(name, doc, labels=self.label_names)
            family.add_metric(list(self.labels), value)
            yield family
