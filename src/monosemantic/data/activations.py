"""Harvest activations: one forward pass feeds any number of hookpoints.

`harvest` packs a corpus into contexts, runs the model in batches only as far as the deepest
hookpoint, drops excluded positions (special tokens by default) and yields `ActivationChunk`s:
one [N, D] float tensor per hookpoint for the N kept tokens, with their token ids and their
(context, position) coordinates. Training can consume the chunks directly (through a
`ShuffleBuffer`), or `monosemantic.data.cache` writes them to disk.

Shapes: B contexts per batch, T context length, D hookpoint width, N kept tokens.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..hooks import run_to_hookpoints
from .tokens import iter_contexts, keep_mask


@dataclass
class ActivationChunk:
    """Activations of the kept tokens of a batch of contexts."""

    acts: dict[str, Tensor]
    """hookpoint -> [N, D] activations."""
    tokens: Tensor
    """[N] token ids."""
    coords: Tensor
    """[N, 2] int64: (context index, position in context) of each token."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def slice(self, start: int, stop: int) -> "ActivationChunk":
        return ActivationChunk({h: a[start:stop] for h, a in self.acts.items()},
                               self.tokens[start:stop], self.coords[start:stop])


def batched_contexts(tokenizer, documents: list[str], ctx_len: int, bos_id: int,
                     batch_size: int, skip_contexts: int = 0) -> Iterator[tuple[int, Tensor]]:
    """Yield (index of the first context, [B, T] token batch), skipping the first contexts."""
    batch: list[np.ndarray] = []
    first = skip_contexts
    for i, ctx in enumerate(iter_contexts(tokenizer, documents, ctx_len, bos_id)):
        if i < skip_contexts:
            continue
        batch.append(ctx)
        if len(batch) == batch_size:
            yield first, torch.from_numpy(np.stack(batch))
            first += batch_size
            batch = []
    if batch:
        yield first, torch.from_numpy(np.stack(batch))


CPU_FORWARD_TOKENS = 1024
"""On the CPU a batch's forward pass runs at most this many tokens at a time (8 contexts of 256 as
two passes of 4, now side by side: `cpu_streams`). Measured on the bundled model with 2 threads,
the passes one after the other: 2,100-2,200 tokens/s against 1,850-1,980 for one pass of 2,048
(its [tokens, MLP width] intermediates are twice the size); each token's activations came out the
same bits either way. As two streams: 1,956 tokens/s against 1,824 at 512 and 1,694 at 256 (medians
of 5 alternations). On accelerators the batch runs whole."""


def cpu_streams(n_contexts: int) -> int:
    """How many forward passes a CPU batch of `n_contexts` runs at once, each on one thread.

    With torch's T threads (2 or more) and at least T contexts in the batch, the batch is split
    into T groups run side by side by T threads with one core each, rather than one pass after
    another with T threads each: measured on the bundled model with 2 threads, 1.11x the tokens/s
    (medians of 8 alternations; 1.07-1.14x each), since per-core GEMMs need no synchronisation
    and the elementwise work and attention no longer wait on each other's threads. 1 means one
    stream with every thread. `MONOSEMANTIC_FORWARD_STREAMS=0` turns streams off."""
    threads = torch.get_num_threads()
    if os.environ.get("MONOSEMANTIC_FORWARD_STREAMS", "") == "0" or threads < 2 or n_contexts < threads:
        return 1
    return threads


@functools.lru_cache(maxsize=None)
def _stream_pool(n: int) -> ThreadPoolExecutor:
    """The `n` stream threads, made once per process (per n)."""
    return ThreadPoolExecutor(n, thread_name_prefix="monosemantic-forward")


def in_cpu_streams(fn: Callable, groups: list) -> list:
    """[fn(g) for g in groups], run side by side on len(groups) threads with one torch thread each;
    torch's thread count is 1 while they run and restored after, and every call has finished (or
    failed) before this returns or raises. Grad mode and autocast are per thread: `fn` sets what
    it needs. One group runs here, on torch's threads."""
    if len(groups) == 1:
        return [fn(groups[0])]
    threads = torch.get_num_threads()
    # a stream thread takes torch's count at its first op, and is only ever used while it is 1
    torch.set_num_threads(1)
    try:
        done = [_stream_pool(len(groups)).submit(fn, g) for g in groups]
        wait(done)
        return [f.result() for f in done]
    finally:
        torch.set_num_threads(threads)


def _forward_passes(model, tokens: Tensor, hookpoints: list[str], rows: int, device,
                    forward_dtype: str) -> list[dict[str, Tensor]]:
    """run_to_hookpoints over `tokens` `rows` contexts at a time (autocast and no-grad set here:
    both are per thread)."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=forward_dtype == "bfloat16"):
        return [run_to_hookpoints(model, tokens[i:i + rows].to(device), hookpoints)
                for i in range(0, len(tokens), rows)]


@torch.no_grad()
def harvest_batch(model, tokens: Tensor, hookpoints: list[str], exclude_ids: list[int],
                  first_context: int = 0, forward_dtype: str = "float32") -> ActivationChunk:
    """Run one [B, T] batch to the deepest hookpoint and keep the non-excluded positions.

    forward_dtype "bfloat16" runs the forward under `torch.autocast`: the matmuls take bf16
    copies of their inputs and weights, everything else (norms, residual stream) stays in the
    model's dtype, and the activations are stored as fp32. On a CPU with AMX (Sapphire Rapids
    and later) the bundled model's layer-15 harvest runs 2.3x faster, and the rounding costs
    0.0015 FVU against the fp32 activations (BENCHMARKS.md, "bf16 forward"); on CPUs without
    AMX or AVX512-BF16 it is much slower.

    On the CPU the batch runs as `cpu_streams` side-by-side streams, one thread each; torch's
    thread count is 1 while they run and restored after."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        parts = _forward_passes(model, tokens, hookpoints, len(tokens), device, forward_dtype)
    else:
        rows = max(1, CPU_FORWARD_TOKENS // tokens.shape[1])
        groups = list(torch.tensor_split(tokens, cpu_streams(len(tokens))))
        parts = [p for ps in in_cpu_streams(
            lambda g: _forward_passes(model, g, hookpoints, rows, device, forward_dtype), groups)
            for p in ps]
    acts = parts[0] if len(parts) == 1 else {h: torch.cat([p[h] for p in parts]) for h in hookpoints}
    mask = keep_mask(tokens, exclude_ids)
    flat_mask = mask.reshape(-1).to(device)
    kept = {h: a.reshape(-1, a.shape[-1])[flat_mask].float().cpu() for h, a in acts.items()}
    rows, cols = mask.nonzero(as_tuple=True)
    coords = torch.stack([rows + first_context, cols], dim=1)
    return ActivationChunk(kept, tokens[mask], coords)


def harvest(model, tokenizer, documents: list[str], hookpoints: list[str], ctx_len: int,
            bos_id: int, batch_size: int, exclude_ids: list[int],
            skip_contexts: int = 0, forward_dtype: str = "float32") -> Iterator[ActivationChunk]:
    """Stream activation chunks for a corpus, one per batch of contexts."""
    for first, tokens in batched_contexts(tokenizer, documents, ctx_len, bos_id, batch_size,
                                          skip_contexts):
        yield harvest_batch(model, tokens, hookpoints, exclude_ids, first, forward_dtype)


class ShuffleBuffer:
    """Mix a stream of activation chunks into shuffled batches of `batch_size` tokens.

    Chunks accumulate until the buffer holds `buffer_tokens`; then the buffer is permuted, its
    first half is served as batches, and the second half stays to mix with what comes next
    (SAELens' mixing buffer). The remainder is served shuffled when the stream ends.
    Deterministic for a given `seed` and stream.
    """

    def __init__(self, chunks: Iterator[ActivationChunk], batch_size: int,
                 buffer_tokens: int = 65536, seed: int = 0):
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) must be at least twice batch_size "
                             f"({batch_size}) to mix anything")
        self.chunks, self.batch_size, self.buffer_tokens = chunks, batch_size, buffer_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        held: list[dict[str, Tensor]] = []
        n_held = 0
        for chunk in self.chunks:
            held.append(chunk.acts)
            n_held += len(chunk)
            if n_held >= self.buffer_tokens:
                buf = self._shuffled(held)
                n_serve = (n_held // 2) // self.batch_size * self.batch_size
                yield from self._batches(buf, n_serve)
                held = [{h: a[n_serve:] for h, a in buf.items()}]
                n_held -= n_serve
        if n_held:
            buf = self._shuffled(held)
            yield from self._batches(buf, n_held)

    def _shuffled(self, held: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        cat = {h: torch.cat([c[h] for c in held]) for h in held[0]}
        perm = torch.randperm(next(iter(cat.values())).shape[0], generator=self.generator)
        return {h: a[perm] for h, a in cat.items()}

    def _batches(self, buf: dict[str, Tensor], n: int) -> Iterator[dict[str, Tensor]]:
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            yield {h: a[start:stop] for h, a in buf.items()}
