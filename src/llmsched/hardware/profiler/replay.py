"""`replay_batches`: time whole forward passes (embedding, every layer, final norm, LM head) for
given batch shapes, to check a latency model against real iteration times."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from llmsched.hardware.profiler.batch import BatchSpec, PackedBatch, check_batch, pack_batch
from llmsched.hardware.profiler.device import Setup, free_bytes, setup
from llmsched.hardware.profiler.layer import DecoderLayer, Embedding, kv_buffers
from llmsched.hardware.profiler.timer import stats
from llmsched.hardware.specs import ModelSpec


def replay_batches(
    model: ModelSpec | str,
    batch_shapes: Iterable[BatchSpec],
    *,
    tp: int = 1,
    device: Any = None,
    tiny: bool | None = None,
    num_layers: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    cuda_graph: bool = True,
    flush_l2: bool = True,
    attention_backend: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Median time in **seconds** of one whole forward pass per batch shape: embedding, every
    decoder layer (the model's count, 2 in tiny mode, or `num_layers`), final norm, and the LM
    head over the last token of each sequence — what one engine iteration computes on one rank
    (no all-reduce, no sampling, no scheduler). Comparable with `LatencyModel.iteration_time`.

    A batch shape is ``(prefills, decodes)``: prefills a list of ``(chunk length, KV already
    cached)`` pairs, decodes a list of the KV length each decode already has. Tokens are
    concatenated without padding. Where the layers' weights and KV do not all fit in GPU memory,
    fewer distinct copies are allocated and reused in turn (a warning says so).
    """
    shapes_in = list(batch_shapes)
    if not shapes_in:
        return []
    checked = []
    for i, shape in enumerate(shapes_in):
        try:
            prefills, decodes = shape
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"batch shape {i} ({shape!r}) is not a (prefills, decodes) pair"
            ) from exc
        checked.append(check_batch(prefills, decodes))
    s = setup(
        model,
        tp=tp,
        device=device,
        tiny=tiny,
        repeats=repeats,
        warmup=warmup,
        cuda_graph=cuda_graph,
        flush_l2=flush_l2,
        attention_backend=attention_backend,
    )
    torch, sh = s.torch, s.shapes
    say = progress or (lambda _msg: None)
    n_layers = sh.num_layers if num_layers is None else int(num_layers)
    if n_layers < 1:
        raise ValueError(f"num_layers must be ≥ 1, got {num_layers}")
    kv_tokens = max(sum(c + p for c, p in pre) + sum(d + 1 for d in dec) for pre, dec in checked)
    max_pos = max(max([c + p for c, p in pre] + [d + 1 for d in dec]) for pre, dec in checked)
    slots = _layer_slots(s, n_layers, kv_tokens)
    if slots < n_layers:
        warnings.warn(
            f"replay_batches: {n_layers} layers of {sh.model} and their KV do not fit in "
            f"{s.device.type} memory; {slots} distinct copies are reused in turn (each larger "
            "than a GPU's L2 cache, so the times are unaffected)",
            stacklevel=2,
        )
    times = []
    with torch.inference_mode():
        emb = Embedding(s)
        layers = [DecoderLayer(s, max_pos, seed=10 + i) for i in range(slots)]
        kvs = [kv_buffers(s, kv_tokens) for _ in range(slots)]
        gen = torch.Generator(device=s.device).manual_seed(6)
        for i, (pre, dec) in enumerate(checked, 1):
            plan = pack_batch(torch, s.device, pre, dec)
            ids = torch.randint(
                0, sh.vocab_size, (plan.num_tokens,), generator=gen, device=s.device
            )

            def forward(plan: PackedBatch = plan, ids: Any = ids) -> Any:
                x = emb.embed(ids)
                for j in range(n_layers):
                    k_buf, v_buf = kvs[j % slots]
                    x = layers[j % slots].forward(x, plan, k_buf, v_buf)
                return emb.logits(x[plan.sample_index])

            median_ms = stats(s.timer(f"replay[{i}]", forward))["median"]
            times.append(median_ms / 1e3)
            say(
                f"[replay] {i}/{len(checked)} {plan.num_tokens} tokens "
                f"({len(pre)} chunks, {len(dec)} decodes): {median_ms:.3f} ms"
            )
    return times


def _layer_slots(s: Setup, n_layers: int, kv_tokens: int) -> int:
    """Distinct (weights, KV) copies that fit: all layers where memory allows."""
    sh = s.shapes
    if sh.tiny:
        return n_layers
    per_layer = (sh.layer_weight_elements() + kv_tokens * sh.kv_elements_per_token()) * s.elem_bytes
    embeddings = 2 * sh.vocab_shard * sh.hidden_size * s.elem_bytes
    budget = 0.85 * free_bytes(s) - embeddings - 2 * 2**30  # room for activations and graphs
    return max(1, min(n_layers, int(budget // per_layer)))
