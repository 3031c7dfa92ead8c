"""Where our trainer's memory goes, phase by phase, on the [O1.3] configuration.

TopK SAE, SmolLM2-135M layer 15 (d = 576), 9,216 features, k = 32, batch 4,096, Adam, fp32, on the
cached wiki-vital activations, through `Trainer.fit` with its defaults (prefetch thread included).
After each phase (trainer built, initialisation on the first batch, every step, the end) it reads
/proc/self/status: RSS split into anonymous memory (what training allocates) and file-backed pages
(the memory-mapped activation cache; the page cache's, dropped under pressure, not ours), and the
peak since the previous phase (VmHWM, reset between phases through /proc/self/clear_refs). It also
sums the storage of every live tensor (gc), which is what the allocator cannot give back.

    python benchmarks/memory_trace.py                                 # default allocator settings
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/memory_trace.py   # glibc: large blocks unmapped
    python benchmarks/memory_trace.py --keep-freed                    # glibc as the CLI sets it

`--steps 122` trains over the whole 500k-token cache, one epoch as the table's quality runs do:
a feature then counts as dead after a tenth of the run (`TrainConfig`'s default, 49,971 tokens),
so AuxK runs in the later steps only. The default 8 steps count dead after 3,277 tokens: AuxK in
every step.

The floor the issue names is weights + Adam state + one batch: 3 x 2 x F x d x 4 bytes +
B x d x 4 bytes = 131 MB here. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

from monosemantic.data import ActivationCache
from monosemantic.train import CoderSpec, TrainConfig, Trainer
from monosemantic.utils import cache_dir

MB = 2**20


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def live_tensor_mb() -> tuple[float, list[tuple[float, tuple]]]:
    """(MB of distinct live strided tensor storages, the largest few as (MB, shape))."""
    seen: dict[int, tuple[int, tuple]] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
                st = obj.untyped_storage()
                seen[st.data_ptr()] = (st.nbytes(), tuple(obj.shape))
        except Exception:  # tensors without storage (meta, sparse views): not memory we hold
            continue
    big = sorted(seen.values(), key=lambda v: -v[0])[:12]
    return sum(v[0] for v in seen.values()) / MB, [(round(n / MB, 1), s) for n, s in big]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="", help="activation cache folder (default: the 500k-token "
                                               "layer-15 wiki-vital train cache)")
    p.add_argument("--hookpoint", default="model.layers.15")
    p.add_argument("--n-features", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-freed", action="store_true",
                   help="glibc's policy as the command-line tool sets it (utils.keep_freed_memory)")
    p.add_argument("--out", default="", help="write the phases as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed:
        from monosemantic.utils import keep_freed_memory
        print(f"keep_freed_memory: {keep_freed_memory()}")
    folder = Path(args.cache) if args.cache else next(
        (cache_dir() / "activations").glob("smollm2-135m-wiki-vital-train-*"))
    cache = ActivationCache(folder)
    d, F, B = cache.widths[args.hookpoint], args.n_features, args.batch_size
    floor = (3 * 2 * F * d * 4 + B * d * 4) / MB
    phases: list[dict] = []

    def mark(name: str) -> None:
        s = status()
        phases.append({"phase": name, "rss": s["VmRSS"], "peak": s["VmHWM"], "anon": s["RssAnon"],
                       "file": s["RssFile"]})
        reset_peak()

    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    from common import warm_imports  # torch.optim's lazy imports: not training memory

    warm_imports()
    mark("imports, cache opened")
    cfg = TrainConfig(activation="topk", n_features=F, k=args.k, tokens=args.steps * B, batch_size=B)
    trainer = Trainer([CoderSpec("coder", args.hookpoint, cfg)], {args.hookpoint: d},
                      Path(tempfile.mkdtemp(prefix="memtrace-")))
    mark("trainer built")
    init, step, done = trainer._initialize, trainer._step, [0]

    def traced_init(batch):
        init(batch)
        mark("initialisation (first batch)")

    def traced_step(*a, **kw):
        step(*a, **kw)
        done[0] += 1
        mark(f"step {done[0]}")
        if done[0] == args.steps:
            phases[-1]["live tensors"] = live_tensor_mb()

    trainer._initialize, trainer._step = traced_init, traced_step
    trainer.fit(lambda start: cache.batches(B, seed=0, start_step=start, hookpoints=[args.hookpoint]),
                progress=False)
    mark("end (fold, save)")
    base = phases[0]["anon"]
    print(f"F={F}, d={d}, B={B}, k={args.k}; floor (weights + Adam + one batch) {floor:.0f} MB; "
          f"anonymous memory after imports {base:.0f} MB")
    print(f"{'phase':30s} {'RSS':>6s} {'peak':>6s} {'anon':>6s} {'file':>6s} {'anon - base':>12s}")
    for ph in phases:
        print(f"{ph['phase']:30s} {ph['rss']:6.0f} {ph['peak']:6.0f} {ph['anon']:6.0f} "
              f"{ph['file']:6.0f} {ph['anon'] - base:12.0f}")
    live, big = phases[-2]["live tensors"]
    top_anon = max(ph["anon"] for ph in phases) - base
    print(f"live tensors after the last step: {live:.0f} MB = {live / floor:.2f} x the floor; largest: {big}")
    print(f"largest anonymous memory over the base: {top_anon:.0f} MB = {top_anon / floor:.2f} x the floor")
    # inside a step: each phase's peak (VmHWM) less the file pages mapped at its end
    top_peak = max(ph["peak"] - ph["file"] for ph in phases[2:]) - base
    print(f"largest peak inside a phase (less file pages) over the base: {top_peak:.0f} MB = "
          f"{top_peak / floor:.2f} x the floor")
    if args.out:
        Path(args.out).write_text(json.dumps({"floor_mb": floor, "phases": phases}, indent=1))


if __name__ == "__main__":
    main()
