"""Activation-harvest throughput: our full caching path against the bare truncated forward pass.

  A  ours   `build_cache` (tokenise + pack, forward with hooks stopped at the hookpoint, drop
            special tokens, write float32 shards atomically with fsync) into a fresh temp folder
  B  bare   the same contexts, pre-tokenised, through a copy of the decoder cut to the layers up
            to the hookpoint (`model.model` with `layers[:L+1]`), no hooks, nothing kept

Both see the same contexts (wiki-vital train split, packed, ctx 256, batch 8). The two are
interleaved A B A B ... in one process after one warm-up batch each; the table gives the median
tokens/s over rounds (tokens = contexts x ctx_len, special tokens included, for both) and the
ratio A / B (target >= 0.9).

With --bf16 a third pipeline joins the rounds:
  C  ours, bf16 forward   `build_cache` with forward_dtype="bfloat16" (the matmuls under
                          torch.autocast; norms and residual stream fp32, activations stored fp32)
and the table gives what the rounding costs: C's activations against A's over the same tokens,
as relative error and as an FVU (squared error over A's total variance, the unit a sparse coder's
reconstruction is scored in), plus a GEMM probe in fp32 and bf16 (AMX shows as bf16 >> fp32).

With --compile another pipeline joins them:
  D  ours, layers compiled   `build_cache` on a second copy of the model whose decoder layers up
                             to the hookpoint are each `torch.compile`d (inductor, static shapes)
and the table gives its first batch's time (the compile; with --cold-compile in an empty inductor
cache, else in the user's, warm from an earlier run) and its activations against A's.

    python benchmarks/harvest.py --tokens 16384 --rounds 3
    python benchmarks/harvest.py --tokens 16384 --rounds 3 --bf16
    python benchmarks/harvest.py --tokens 16384 --rounds 4 --compile [--cold-compile]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

from monosemantic.data import CacheRequest, build_cache, iter_contexts, keep_mask, load_corpus
from monosemantic.data import special_token_ids
from monosemantic.models import load_model


def truncated(model: nn.Module, layer: int) -> nn.Module:
    """The decoder (`model.model`) keeping layers 0..layer; weights are shared, not copied."""
    bare = copy.copy(model.model)
    bare._modules = dict(bare._modules)
    bare.layers = nn.ModuleList(list(model.model.layers)[:layer + 1])
    return bare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per round (rounded to batches)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--bf16", action="store_true",
                   help="also build_cache with forward_dtype=bfloat16, and its activation error")
    p.add_argument("--compile", action="store_true",
                   help="also build_cache on a model whose decoder layers are torch.compile'd")
    p.add_argument("--cold-compile", action="store_true",
                   help="with --compile: compile in an empty inductor cache (a temp folder)")
    args = p.parse_args()
    if args.cold_compile:  # an empty inductor cache, removed at exit
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold = tempfile.mkdtemp(prefix="inductor-")
        atexit.register(shutil.rmtree, cold, ignore_errors=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m")
    docs = load_corpus("wiki-vital", "train").documents
    hookpoint = f"model.layers.{args.layer}"
    b, t = args.batch_size, args.ctx_len
    n_ctx = max(1, round(args.tokens / (t * b))) * b
    contexts = []
    for ctx in iter_contexts(lm.tokenizer, docs, t, lm.bos_token_id):
        contexts.append(ctx)
        if len(contexts) == n_ctx:
            break
    batches = [torch.from_numpy(np.stack(contexts[i:i + b])) for i in range(0, n_ctx, b)]
    exclude = tuple(special_token_ids(lm.tokenizer))
    kept = int(sum(keep_mask(x, list(exclude)).sum() for x in batches))
    request = CacheRequest(model=lm.name, corpus="wiki-vital", split="train",
                           hookpoints=(hookpoint,), n_tokens=kept, ctx_len=t, batch_size=b,
                           contexts_per_shard=64 if 64 % b == 0 else b, exclude_ids=exclude)
    bare = truncated(lm.model, args.layer)
    assert len(bare.layers) == args.layer + 1 and len(lm.model.model.layers) == 30

    @torch.no_grad()
    def run_bare(xs):
        for x in xs:
            bare(input_ids=x, use_cache=False)

    kept_acts: dict[str, torch.Tensor] = {}  # the last round's activations, by forward dtype

    def run_ours(req, model=lm, key=""):
        with tempfile.TemporaryDirectory() as tmp:
            cache = build_cache(model, docs, req, f"{tmp}/cache", progress=False)
            assert len(cache) == req.n_tokens
            kept_acts[key or req.forward_dtype] = cache.read(hookpoint, 0, len(cache)).clone()

    warm = CacheRequest(**{**request.__dict__, "n_tokens": 100})
    run_ours(warm)
    run_bare(batches[:1])

    n_tok = n_ctx * t
    pipelines = {"ours (build_cache)": lambda: run_ours(request),
                 "bare truncated forward": lambda: run_bare(batches)}
    if args.bf16:
        bf16 = CacheRequest(**{**request.__dict__, "forward_dtype": "bfloat16"})
        run_ours(CacheRequest(**{**bf16.__dict__, "n_tokens": 100}))
        pipelines["ours, bf16 forward"] = lambda: run_ours(bf16)
    if args.compile:
        compiled = load_model("smollm2-135m")
        for layer in list(compiled.model.model.layers)[:args.layer + 1]:
            layer.compile(dynamic=False)
        first = CacheRequest(**{**request.__dict__, "n_tokens": 100})
        start = time.perf_counter()
        run_ours(first, compiled, "compiled")
        compile_s = time.perf_counter() - start
        pipelines["ours, layers compiled"] = lambda: run_ours(request, compiled, "compiled")
    speed: dict[str, list[float]] = {name: [] for name in pipelines}
    print(f"smollm2-135m {hookpoint}, wiki-vital, {n_ctx} contexts x {t} = {n_tok} tokens/round "
          f"({kept} kept), batch {b}, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} rounds")
    for r in range(args.rounds):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            fn()
            speed[name].append(n_tok / (time.perf_counter() - start))
            print(f"  round {r + 1}: {name:24s} {speed[name][-1]:8.1f} tok/s", flush=True)
    print("\n| pipeline | median tok/s | rounds (tok/s) |\n|---|---:|---|")
    for name, xs in speed.items():
        print(f"| {name} | {statistics.median(xs):.1f} | {', '.join(f'{x:.1f}' for x in xs)} |")
    ours, bare_ = (statistics.median(xs) for xs in list(speed.values())[:2])
    print(f"\nratio ours / bare = {ours / bare_:.3f} (target >= 0.9)")
    if args.compile:
        exact, other = kept_acts["float32"], kept_acts["compiled"]
        where = "an empty" if args.cold_compile else "the user's"
        print(f"ratio compiled / eager = {statistics.median(speed['ours, layers compiled']) / ours:.3f}; "
              f"first batch (compiling) {compile_s:.1f} s "
              f"({where} inductor cache); activations "
              f"against eager: relative error {((other - exact).norm() / exact.norm()).item():.2e}")
    if args.bf16:
        exact, rounded = kept_acts["float32"], kept_acts["bfloat16"]
        err = (rounded - exact).pow(2).sum()
        fvu = err / (exact - exact.mean(0)).pow(2).sum()
        print(f"ratio bf16 forward / fp32 = {statistics.median(speed['ours, bf16 forward']) / ours:.2f}; "
              f"bf16 activations against fp32 over {len(exact)} tokens: relative error "
              f"{(err.sqrt() / exact.norm()).item():.2e}, as FVU {fvu.item():.2e}")
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        a, w = torch.randn(1024, 576), torch.randn(1536, 576)
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), w.to(dtype)
            x @ y.T
            start = time.perf_counter()
            for _ in range(20):
                x @ y.T
            rate = 20 * 2 * 1024 * 576 * 1536 / (time.perf_counter() - start) / 1e9
            print(f"GEMM probe [1024, 576] x [576, 1536] {str(dtype)[6:]}: {rate:.0f} GFLOP/s")
        print("CPU has AMX-BF16:", "amx_bf16" in flags, "; AVX512-BF16:", "avx512_bf16" in flags)


if __name__ == "__main__":
    main()
