"""Where one training step of ours spends its time: `torch.profiler` over a few steps of the
speed table's configuration (TopK SAE on the 500k-token layer-15 cache, 9,216 features, k 32,
batch 4,096, the default sparse path), ops grouped with their input shapes.

    python benchmarks/profile_step.py --steps 5 --threads 2

Prints the ops by self CPU time and the share of the step each takes, the encoder GEMM's FLOP
rate, and a GEMM probe of the same shape in the same process; writes the table as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from train_speed import add_setup_args, find_cache, gemm_gflops  # the speed table's set-up

from monosemantic.train import CoderSpec, TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_args(p)
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 untimed ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dead-tokens", type=int, default=0,
                   help="tokens without firing before a feature is dead (0: a tenth of the cache)")
    p.add_argument("--top", type=int, default=20, help="ops to print")
    p.add_argument("--out", default="runs/profile-step.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = find_cache(args)
    d = cache.widths[args.hookpoint]
    warm = 2
    # dead features as in the speed table's timed steps: after a tenth of an epoch over the cache
    # (--dead-tokens 1 counts a feature dead after one batch without firing, so AuxK runs)
    dead = args.dead_tokens or TrainConfig(tokens=len(cache)).resolve(d).dead_tokens
    cfg = TrainConfig(n_features=args.n_features, k=args.k, batch_size=args.batch_size,
                      tokens=(warm + args.steps) * args.batch_size, checkpoint_every=10_000,
                      dead_tokens=dead)
    trainer = Trainer([CoderSpec("coder", args.hookpoint, cfg)], {args.hookpoint: d},
                      Path(tempfile.mkdtemp(prefix="profile-step-")))
    step, times = trainer._step, []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                  schedule=torch.profiler.schedule(wait=0, warmup=warm, active=args.steps,
                                                                           repeat=1))

    def profiled(st, batch, i):
        t0 = time.perf_counter()
        with torch.profiler.record_function("train step"):
            step(st, batch, i)
        times.append(time.perf_counter() - t0)
        prof.step()

    trainer._step = profiled
    with prof:
        trainer.fit(lambda s: cache.batches(args.batch_size, seed=0, start_step=s,
                                            hookpoints=[args.hookpoint]), progress=False)
    step_ms = 1e3 * sum(times[warm:]) / args.steps
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "train step" or e.self_cpu_time_total <= 0:
            continue
        ms = e.self_cpu_time_total / 1e3 / args.steps
        rows.append({"op": e.key, "shapes": str(e.input_shapes)[:90], "calls per step": e.count / args.steps,
                     "self ms per step": ms, "share of step": ms / step_ms})
    rows.sort(key=lambda r: -r["self ms per step"])
    rows = [r for r in rows if r["self ms per step"] >= 0.1]  # the rest adds up to under a few ms
    gemm_flop = 2 * args.batch_size * d * args.n_features
    # the encoder's forward GEMM, in row chunks and feature blocks: [rows, d] @ [d, features]
    enc = [r for r in rows if r["op"] in ("aten::addmm", "aten::mm", "aten::matmul")
           and f", {d}], [{d}, " in r["shapes"]]
    probe = gemm_gflops(args.batch_size, d, args.n_features)
    print(f"step {step_ms:.1f} ms ({args.batch_size / step_ms * 1e3:,.0f} tokens/s) over {args.steps} "
          f"profiled steps; GEMM probe {probe:.1f} GFLOP/s")
    if enc:
        enc_ms = sum(r["self ms per step"] for r in enc)
        print(f"encoder-shaped GEMMs: {enc_ms:.1f} ms per step = {enc_ms / step_ms:.0%} of the step, "
              f"{gemm_flop / enc_ms / 1e6:.0f} GFLOP/s if they are the one forward GEMM")
    print(f"{'self ms':>8} {'share':>6} {'calls':>5}  op  shapes")
    for r in rows[:args.top]:
        print(f"{r['self ms per step']:8.1f} {r['share of step']:6.1%} {r['calls per step']:5.1f}  "
              f"{r['op']}  {r['shapes']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "step ms": step_ms, "gemm probe GFLOP/s": probe,
                               "ops": rows}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
