"""Distributed training on this machine: 1 and 2 gloo processes, tokens/s, communication, memory.

    python benchmarks/scaling.py                  # every configuration; table + JSON
    python benchmarks/scaling.py --steps 4        # a quick look

Configurations (one coder shape throughout: TopK SAE, d = 576 as SmolLM2-135M's residual
stream, n = 8 d = 4,608 features, k = 32, global batch B = 2,048 tokens, fp32, 1 thread per rank):
  data-1     one process, one coder
  data-2     two ranks, data-parallel: B/2 rows each, gradients all-reduced
  layers-1   one process, four coders (four hookpoints)
  layers-2   two ranks, layers mode: two coders each; every rank reads B/2 rows of all four
             hookpoints and sends its rows of the other rank's two to it
Each runs in fresh spawned processes. A step's clock runs from one call of Parallel.exchange (the
start of a step in the trainer's main thread; batches are read ahead in a background thread) to the
next, over steps 1..N; tokens/s = global tokens / mean step time. Step 0 (initialisation from the
first batch: geometric median and the bisection of the encoder scale) is reported apart.
"cpu s/step" is the busiest rank's CPU time per step (all its threads): on a machine shared with
other jobs it is what the step would take on a core of its own. "comm" is the wall time inside
collectives per step (Parallel.comm_seconds), waiting for the other rank included. Memory: peak RSS of each rank, and the same before the trainer is built (torch and
the activation pool), so the difference is the training's own.
Probes, for the model in SCALING.md: the GEMM rate of the encoder's shape on one thread, and the
time of an all-reduce of one coder's gradients (2 d n floats) between the two ranks.

Activations are synthetic (Gaussian through a random mixing matrix, 8 batches cycled): speed does
not depend on the data beyond the sparsity, which k fixes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D, N_FEATURES, K, BATCH = 576, 4608, 32, 2048
HOOKPOINTS = ["h0", "h1", "h2", "h3"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pool(rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D, D, generator=g) / D ** 0.5
    return torch.randn(rows, D, generator=g) @ mix


def _worker(rank: int, world: int, port: int, mode: str, n_coders: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from monosemantic.train import CoderSpec, TrainConfig, Trainer
    from monosemantic.train.distributed import DistConfig, Parallel, shard_rows

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    pool = _pool(8 * BATCH)
    base_rss = _rss_mb()
    lo, hi = shard_rows(BATCH, rank, world)
    cfg = TrainConfig(k=K, n_features=N_FEATURES, batch_size=BATCH, tokens=(steps + 1) * BATCH,
                      checkpoint_every=10**9, log_every=10**9)
    specs = [CoderSpec(h, h, cfg) for h in HOOKPOINTS[:n_coders]]
    marks: list[tuple[float, float]] = []

    class Timed(Parallel):  # the trainer calls exchange at the start of every step
        def exchange(self, batch, step):
            marks.append((time.perf_counter(), self.comm_seconds, time.process_time()))
            return super().exchange(batch, step)

    parallel = Timed.current(DistConfig(distribute=mode))
    trainer = Trainer(specs, {h: D for h in HOOKPOINTS}, Path(out) / "run", parallel=parallel)

    def batches(start: int):
        for s in range(start, 10**9):
            rows = pool[(s % 8) * BATCH:][lo:hi]
            yield {h: rows for h in HOOKPOINTS[:n_coders]}

    trainer.fit(batches, progress=False)
    (t1, c1, p1), (tn, cn, pn) = marks[1], marks[-1]  # from the start of step 1 to the last's
    result = {"rank": rank, "step_s": (tn - t1) / (len(marks) - 2),
              "cpu_s": (pn - p1) / (len(marks) - 2),
              "comm_s": (cn - c1) / (len(marks) - 2), "init_s": t1 - marks[0][0],
              "rss_mb": _rss_mb(), "base_rss_mb": base_rss, "coders": len(trainer.states),
              "steps_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])]}
    if world > 1:  # probe: one coder's gradient all-reduce (W_enc, W_dec, biases)
        buf = torch.randn(2 * D * N_FEATURES + N_FEATURES + D)
        dist.all_reduce(buf)
        start = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(buf)
        result["allreduce_s"] = (time.perf_counter() - start) / 5
        result["allreduce_mb"] = buf.numel() * 4 / 2**20
        dist.destroy_process_group()
    else:
        x, w = torch.randn(BATCH, D), torch.randn(N_FEATURES, D)
        x @ w.T
        start = time.perf_counter()
        for _ in range(5):
            x @ w.T
        result["gemm_gflops"] = 2 * BATCH * D * N_FEATURES * 5 / (time.perf_counter() - start) / 1e9
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run(name: str, mode: str, world: int, n_coders: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, port, mode, n_coders, steps, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{name}: a rank failed (exit codes {[p.exitcode for p in procs]})")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    print(name, [[round(t, 3) for t in r["steps_s"]] for r in ranks], flush=True)
    step = max(r["step_s"] for r in ranks)
    row = {"config": name, "ranks": world, "coders": n_coders, "tokens/s": BATCH / step,
           "step s": step, "cpu s/step": max(r["cpu_s"] for r in ranks),
           "comm s/step": max(r["comm_s"] for r in ranks),
           "step 0 s": max(r["init_s"] for r in ranks),
           "peak RSS MB/rank": max(r["rss_mb"] for r in ranks),
           "training MB/rank": max(r["rss_mb"] - r["base_rss_mb"] for r in ranks)}
    for key in ("gemm_gflops", "allreduce_s", "allreduce_mb"):
        if key in ranks[0]:
            row[key] = ranks[0][key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--json", default="benchmarks/results/scaling.json")
    parser.add_argument("--only", nargs="*", default=[], help="configurations to run (default: all)")
    args = parser.parse_args()
    from monosemantic.metrics import format_table

    configs = [("data-1", "data", 1, 1), ("data-2", "data", 2, 1), ("layers-1", "layers", 1, 4),
               ("layers-2", "layers", 2, 4)]
    rows = [run(*c, args.steps) for c in configs if not args.only or c[0] in args.only]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"d": D, "n_features": N_FEATURES, "k": K, "batch": BATCH,
                                           "steps": args.steps, "cpu_count": os.cpu_count(),
                                           "torch": torch.__version__, "load": os.getloadavg(),
                                           "rows": rows}, indent=2))
    print(f"TopK SAE d={D} n={N_FEATURES} k={K}, global batch {BATCH}, {args.steps} timed steps, "
          f"1 thread per rank, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
