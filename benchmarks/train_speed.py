"""Training speed and quality of a TopK SAE: ours against eai-sparsify, SAELens and
dictionary-learning, side by side on the same cached activations, same configuration, one run.

    python benchmarks/train_speed.py                          # full run: on a quiet machine
    python benchmarks/train_speed.py --smoke                  # every implementation, a few steps
    python benchmarks/train_speed.py --lr-sweep               # quality at 0.5x, 1x, 2x, 4x each LR
    python benchmarks/train_speed.py --e2e --e2e-tokens 65536 # also end to end from raw text

Configuration (issue O1.3): TopK SAE on SmolLM2-135M layer 15 (d = 576) from the cached
wiki-vital activations (500k tokens), 9,216 features, k = 32, batch 4,096 tokens, Adam, fp32, CPU.

Steps:
  1. peer environments: one venv per peer with torch 2.13.0 CPU (benchmarks/peers/envs.py);
  2. speed: for each round, a GEMM probe ([4096 x 576] @ [576 x 9216], the SAE encoder's shape)
     in this process, then every implementation in turn (A B C D A B C D ...), each in a fresh
     process (benchmarks/peers/worker_*.py) running `--warmup` untimed steps and `--steps` timed
     ones on the same batches; tokens/s is the median over all timed steps of batch / step time
     (a peer's batch is read before its step's clock starts; our Trainer reads the next batch in
     its own prefetch thread during the step, which therefore counts);
     peak RSS is the process's maximum; train RSS is that minus the RSS after imports and data
     set-up (before the coder exists), compared with weights + Adam state + one batch ("floor");
  3. ceilings from the median GEMM rate: dense 12 d n FLOP/token (forward and backward of two
     d x n matrices), sparse-aware 2 d n FLOP/token (the dense encoder forward only);
  4. quality: each implementation trains one epoch with its recommended LR (and 0.5x, 2x, 4x with
     --lr-sweep, keeping the best; --reuse takes finished rows from an earlier results.json),
     saves the coder in its own layout; we load it through
     monosemantic.coders.interop and score it with monosemantic.metrics.ReconstructionStats on the
     eval split (its own activation cache, built once): FVU, FVU without outlier tokens (norm >
     10x the median), L0, dead %. "interop err" is the largest difference between the loaded
     coder's outputs and the peer's own forward on 512 tokens (relative to the output's largest
     entry); our coder saved with save_sparsify / save_saelens is read back by each peer as well.
  5. --e2e: sparsify's own Trainer (model + tokens: a full 30-layer forward per batch) against
     `monosemantic train` from raw text (harvest stopping at layer 15, then train), same config.

How each peer is driven is in its worker's docstring: sparsify's SparseCoder in a loop mirroring
its trainer's per-step code (its Trainer only takes a model and tokens), SAELens' own SAETrainer
(dense path: its sparse activations crash in backward on CPU with torch 2.13), dictionary-
learning's TopKTrainer.update as trainSAE calls it. Peer LR warm-ups given in steps (1,000) are
capped at --peer-warmup-frac of the run, since those defaults assume runs far longer than one
epoch here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from envs import PEERS, ensure_env  # noqa: E402

from monosemantic.coders.interop import load_any, save_saelens, save_sparsify  # noqa: E402
from monosemantic.data import ActivationCache, build_cache, list_caches  # noqa: E402
from monosemantic.metrics import ReconstructionStats, format_table  # noqa: E402

IMPLS = {"ours": "monosemantic", "sparsify": PEERS["sparsify"]["package"],
         "saelens": PEERS["saelens"]["package"], "dictlearn": PEERS["dictlearn"]["package"]}


def find_cache(args) -> ActivationCache:
    if args.cache:
        return ActivationCache(args.cache)
    for c in list_caches():
        r = c.request
        if (r.model, r.corpus, r.split, c.complete) == ("smollm2-135m", "wiki-vital", "train", True) \
                and args.hookpoint in r.hookpoints and len(c) >= 500_000:
            return c
    raise SystemExit("no complete smollm2-135m wiki-vital train cache of model.layers.15 with 500k "
                     "tokens: make it with `monosemantic cache smollm2-135m wiki-vital "
                     "--hookpoints model.layers.15 --tokens 500000`, or pass --cache FOLDER")


def eval_cache(train: ActivationCache, n_tokens: int, hookpoint: str) -> ActivationCache:
    """The eval-split cache matching `train`'s request (built once, with the model)."""
    import dataclasses

    from monosemantic.data import load_corpus
    from monosemantic.models import load_model

    req = dataclasses.replace(train.request, split="eval", n_tokens=n_tokens, hookpoints=(hookpoint,))
    folder = req.default_folder()
    if (folder / "manifest.json").exists() and ActivationCache(folder).complete:
        return ActivationCache(folder)
    lm = load_model(req.model)
    return build_cache(lm, load_corpus(req.corpus, "eval").documents, req, folder)


OURS_TRAIN: dict = {}
"""TrainConfig overrides for our worker (--ours-train), for diagnosing quality differences."""


def run_worker(impl: str, payload: dict, threads: int, timeout: float) -> dict:
    python = sys.executable if impl == "ours" else str(ensure_env(impl))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(HERE.parent / "src"), SPARSIFY_DISABLE_TRITON="1")
    if impl == "ours" and OURS_TRAIN:
        payload = {**payload, "train": OURS_TRAIN}
    cmd = [python, str(HERE / "peers" / f"worker_{impl}.py"), json.dumps(payload)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stdout.splitlines()[-25:])
        raise RuntimeError(f"worker {impl} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def gemm_gflops(batch: int, d: int, n: int, reps: int = 5) -> float:
    """GFLOP/s of the encoder-shaped GEMM [batch x d] @ [d x n], median of `reps` after one warm-up."""
    a, b = torch.randn(batch, d), torch.randn(d, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * batch * d * n / statistics.median(times) / 1e9


def epoch_steps(args, cache: ActivationCache) -> int:
    """Steps in the quality runs' epoch."""
    return min(len(cache), args.epoch_tokens or len(cache)) // args.batch_size


def speed(args, cache: ActivationCache, d: int) -> tuple[dict, list[float]]:
    base = {"cache": str(cache.folder), "hookpoint": args.hookpoint, "batch_size": args.batch_size,
            "n_features": args.n_features, "k": args.k, "steps": args.steps, "warmup": args.warmup,
            # the timed steps stand for the epoch's: our Trainer counts features dead (and pays
            # AuxK for them) after the epoch's tenth, not after a tenth of these few steps
            "epoch_tokens": epoch_steps(args, cache) * args.batch_size,
            "threads": args.threads, "lr": None, "warmup_frac": args.peer_warmup_frac,
            "norm_batches": args.dl_norm_batches}
    runs: dict[str, list[dict]] = {i: [] for i in args.impls}
    gemm = []
    for r in range(args.rounds):
        gemm.append(gemm_gflops(args.batch_size, d, args.n_features))
        for impl in args.impls:  # A B C D, A B C D, ...
            res = run_worker(impl, {**base, "seed": r}, args.threads, args.timeout)
            runs[impl].append(res)
            tps = [args.batch_size / s for s in res["step_s"]]
            print(f"round {r}: {impl:9s} {statistics.median(tps):8.0f} tokens/s, peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB (GEMM {gemm[-1]:.1f} GFLOP/s)", flush=True)
    return runs, gemm


def evaluate(coder, x: torch.Tensor, batch: int = 4096) -> dict:
    stats = ReconstructionStats()
    limit = 10 * float(x.norm(dim=1).median())
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            out = coder(xb)
            stats.update(out.out, xb, out.acts, outlier_mask=xb.norm(dim=1) > limit)
    m = stats.compute()
    return {"fvu": m.fvu, "fvu w/o outliers": m.fvu_excluding_outliers, "l0": m.l0,
            "dead %": 100 * m.dead_fraction}


def interop_error(coder, folder: Path) -> float:
    from safetensors.torch import load_file

    path = folder / "reference.safetensors"
    if not path.exists():
        return float("nan")
    ref = load_file(str(path))
    with torch.no_grad():
        got = coder(ref["x"]).out
    return float((got - ref["out"]).abs().max() / ref["out"].abs().max())


def quality(args, cache: ActivationCache, x_eval: torch.Tensor, out: Path) -> dict:
    steps = epoch_steps(args, cache)
    base = {"cache": str(cache.folder), "hookpoint": args.hookpoint, "batch_size": args.batch_size,
            "n_features": args.n_features, "k": args.k, "steps": steps, "warmup": 0, "seed": args.seed,
            "threads": args.threads, "warmup_frac": args.peer_warmup_frac,
            "norm_batches": args.dl_norm_batches}
    best: dict[str, dict] = {}
    earlier = {}  # impl -> rows of an earlier run's sweep (--reuse)
    if args.reuse:
        earlier = {impl: q["tried"] for impl, q in json.loads(Path(args.reuse).read_text())["quality"].items()}
    for impl in args.impls:
        lr, tried = None, []
        mults = [1.0] + [m for m in args.lr_mults if m != 1.0] if args.lr_sweep else [1.0]
        for mult in mults:
            want = None if mult == 1.0 else lr * mult
            old = [r for r in earlier.get(impl, []) if (want is None and r is earlier[impl][0])
                   or (want is not None and abs(r["lr"] / want - 1) < 1e-3)]
            # same impl, same LR, same settings; ours also needs its coder (read by the peers below)
            if old and (impl != "ours" or Path(old[0]["folder"]).exists()):
                row = dict(old[0])
                lr = lr or row["lr"]
                print(f"quality: {impl:9s} lr {row['lr']:.2e}: reused from {args.reuse}", flush=True)
                tried.append(row)
                continue
            folder = out / "quality" / f"{impl}-x{mult:g}"
            if folder.exists():
                shutil.rmtree(folder)
            res = run_worker(impl, {**base, "lr": want, "out": str(folder)}, args.threads, args.timeout)
            lr = lr or res["lr"]
            coder = load_any(res["folder"])
            row = {**evaluate(coder, x_eval), "lr": res["lr"], "epoch s": res["wall_s"],
                   "interop err": interop_error(coder, Path(res["folder"])), "folder": res["folder"]}
            print(f"quality: {impl:9s} lr {res['lr']:.2e}: fvu {row['fvu']:.4f}, l0 {row['l0']:.1f}, "
                  f"dead {row['dead %']:.1f}%, {steps} steps in {res['wall_s']:.0f} s", flush=True)
            tried.append(row)
        best[impl] = min(tried, key=lambda r: r["fvu"]) | {"tried": tried}
    if "ours" in best:
        best["ours"]["read by peers"] = peers_read_ours(best["ours"]["folder"], x_eval[:512], out, args)
    return best


def peers_read_ours(folder: str, x: torch.Tensor, out: Path, args) -> dict:
    """Save our trained coder in each peer's layout and run the peer's own loader and forward."""
    from safetensors.torch import load_file, save_file

    coder = load_any(folder)
    xfile = out / "quality" / "x.safetensors"
    save_file({"x": x.contiguous()}, str(xfile))
    with torch.no_grad():
        ours = coder(x).out
    errs = {}
    for layout, save in (("sparsify", save_sparsify), ("saelens", save_saelens)):
        target = out / "quality" / f"ours-as-{layout}"
        save(coder, target)
        res = _check(layout, target, xfile, args)
        theirs = load_file(res["out"])["out"]
        errs[layout] = float((theirs - ours).abs().max() / ours.abs().max())
    return errs


def _check(layout: str, folder: Path, xfile: Path, args) -> dict:
    python = str(ensure_env(layout))
    cmd = [python, str(HERE / "peers" / "worker_check.py"),
           json.dumps({"layout": layout, "folder": str(folder), "x": str(xfile)})]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{layout} could not read our coder:\n{done.stdout[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(args, runs: dict, gemm: list[float], best: dict, d: int) -> list[dict]:
    rate = statistics.median(gemm)
    dense, sparse = rate * 1e9 / (12 * d * args.n_features), rate * 1e9 / (2 * d * args.n_features)
    tps = {i: statistics.median([args.batch_size / s for r in rs for s in r["step_s"]])
           for i, rs in runs.items()}
    peers = [i for i in tps if i != "ours"]
    fastest = max((tps[i] for i in peers), default=float("nan"))
    rows = []
    for impl in runs:
        row = {"impl": impl, "version": IMPLS[impl], "tokens/s": tps[impl],
               "x fastest peer": tps[impl] / fastest, "of sparse ceiling": tps[impl] / sparse,
               "peak RSS MB": max(r["peak_rss_mb"] for r in runs[impl]),
               "train RSS MB": max(r.get("train_rss_mb", float("nan")) for r in runs[impl])}
        if impl in best:
            q = best[impl]
            row.update({k: q[k] for k in ("lr", "fvu", "fvu w/o outliers", "l0", "dead %",
                                           "epoch s", "interop err")})
        rows.append(row)
    params = 2 * args.n_features * d + args.n_features + d
    floor_mb = (3 * params + args.batch_size * d) * 4 / 2**20
    for row in rows:
        row["train RSS / floor"] = row["train RSS MB"] / floor_mb
    print(f"\nGEMM [{args.batch_size} x {d}] @ [{d} x {args.n_features}]: median {rate:.1f} GFLOP/s "
          f"over {len(gemm)} probes -> dense ceiling {dense:,.0f} tokens/s (12 d n FLOP/token), "
          f"sparse-aware ceiling {sparse:,.0f} tokens/s (2 d n); threads {args.threads}; "
          f"weights + Adam state + one batch = {floor_mb:.0f} MB")
    print(format_table(rows))
    if "ours" in best and "read by peers" in best["ours"]:
        errs = best["ours"]["read by peers"]
        print("our trained coder saved in each peer's layout and run by the peer itself, max "
              "relative difference: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    return rows


def e2e(args, cache: ActivationCache, out: Path) -> list[dict]:
    """sparsify's own Trainer from tokens vs `monosemantic train` from raw text, same config."""
    import numpy as np

    from monosemantic.data import iter_contexts, load_corpus, special_token_ids
    from monosemantic.models import bundled_model_path, load_model

    req = cache.request
    lm = load_model(req.model)
    ctx_per_batch = max(1, args.batch_size // req.ctx_len)
    n_ctx = -(-args.e2e_tokens // req.ctx_len) // ctx_per_batch * ctx_per_batch or ctx_per_batch
    docs = load_corpus(req.corpus, "train").documents
    ctxs = []
    for c in iter_contexts(lm.tokenizer, docs, req.ctx_len, lm.bos_token_id):
        ctxs.append(c)
        if len(ctxs) == n_ctx:
            break
    folder = out / "e2e"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    np.save(folder / "tokens.npy", np.stack(ctxs))
    exclude = special_token_ids(lm.tokenizer)
    payload = {"model": str(bundled_model_path(req.model)), "tokens": str(folder / "tokens.npy"),
               "hookpoint": args.hookpoint.removeprefix("model."), "n_features": args.n_features,
               "k": args.k, "batch_contexts": ctx_per_batch, "exclude": exclude,
               "out": str(folder / "sparsify"), "threads": args.threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), SPARSIFY_DISABLE_TRITON="1")

    def run_sparsify() -> tuple[dict, float]:
        t0 = time.perf_counter()
        done = subprocess.run([str(ensure_env("sparsify")), str(HERE / "peers" / "worker_sparsify_e2e.py"),
                               json.dumps(payload)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, timeout=args.timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"sparsify end to end failed:\n{done.stdout[-3000:]}")
        return json.loads(lines[-1][len("RESULT "):]), time.perf_counter() - t0

    sp, sp_process = run_sparsify()
    tokens = sp["tokens"] // args.batch_size * args.batch_size
    cmd = [sys.executable, "-m", "monosemantic", "train", req.model, req.corpus, "--hookpoints",
           args.hookpoint, "--tokens", str(tokens), "--batch-size", str(args.batch_size),
           "--n-features", str(args.n_features), "--k", str(args.k), "--eval-tokens", "0",
           "--out", str(folder / "ours")]

    def drop_harvest_caches() -> None:
        """A cache for this token count (this harvest's, or one an earlier command left) is
        removed, so that our run harvests instead of reading it."""
        for c in list_caches():
            if c.request.n_tokens == tokens and c.folder != cache.folder and c.request.split == "train":
                shutil.rmtree(c.folder, ignore_errors=True)

    def run_ours() -> float:
        drop_harvest_caches()
        shutil.rmtree(folder / "ours", ignore_errors=True)  # else a finished run is not retrained
        t0 = time.perf_counter()
        ran = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             timeout=args.timeout)
        wall = time.perf_counter() - t0
        (folder / f"ours-{len(walls)}.log").write_text(ran.stdout)  # its progress bars: the phases
        if ran.returncode != 0:
            raise RuntimeError(f"monosemantic train failed:\n{ran.stdout[-3000:]}")
        drop_harvest_caches()
        return wall

    # rounds of sparsify, ours (the machine's speed drifts by 10% over minutes: each round's ratio
    # is of two neighbouring runs; the table has the medians)
    sp_walls, sp_loads, walls = [sp_process], [sp["wall_s"]], []
    walls.append(run_ours())
    print(f"e2e round 0: sparsify {sp_process:.1f} s, ours {walls[-1]:.1f} s", flush=True)
    for r in range(1, args.e2e_rounds):
        sp_r, wall_r = run_sparsify()
        sp_walls.append(wall_r)
        sp_loads.append(sp_r["wall_s"])
        walls.append(run_ours())
        print(f"e2e round {r}: sparsify {wall_r:.1f} s, ours {walls[-1]:.1f} s", flush=True)
    sp_process, wall = statistics.median(sp_walls), statistics.median(walls)
    # both timed as whole processes (interpreter start, imports, model load, data, training,
    # saving: what a user waits for); "load to end" is sparsify's Trainer timed from its model load
    rows = [{"impl": "sparsify Trainer (model + tokens)", "tokens": sp["tokens"],
             "wall s": sp_process, "tokens/s": sp["tokens"] / sp_process,
             "load to end s": statistics.median(sp_loads), "rounds s": sp_walls},
            {"impl": "monosemantic train (raw text)", "tokens": tokens, "wall s": wall,
             "tokens/s": tokens / wall, "rounds s": walls}]
    rows[1]["x sparsify"] = rows[1]["tokens/s"] / rows[0]["tokens/s"]
    rows[1]["x sparsify by round"] = [(tokens / b) / (sp["tokens"] / a) for a, b in zip(sp_walls, walls)]
    print("\nend to end from text (wall time of each whole process; medians over rounds):")
    print(format_table(rows, ["impl", "tokens", "wall s", "tokens/s", "load to end s", "x sparsify"]))
    return rows


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """The table's data and coder: the cache, the hookpoint, the SAE's size and the batch."""
    p.add_argument("--cache", default="", help="training activation cache folder (default: found)")
    p.add_argument("--hookpoint", default="model.layers.15")
    p.add_argument("--n-features", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_args(p)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--rounds", type=int, default=3, help="A B C D rounds of the speed test (0: none)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per worker and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (initialisation)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-quality", action="store_true", help="skip the one-epoch quality runs")
    p.add_argument("--epoch-tokens", type=int, default=0, help="quality budget (0 = the whole cache)")
    p.add_argument("--lr-sweep", action="store_true", help="quality at --lr-mults x each LR")
    p.add_argument("--lr-mults", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0],
                   help="LR multiples of each implementation's recommended LR for --lr-sweep")
    p.add_argument("--reuse", default="",
                   help="an earlier results.json whose quality rows (same implementation and LR, "
                        "same settings: the caller's responsibility) are taken instead of retrained")
    p.add_argument("--eval-tokens", type=int, default=32768, help="eval-split tokens for quality")
    p.add_argument("--seed", type=int, default=0,
                   help="quality runs' seed (initialisation and batch order; the same for every impl)")
    p.add_argument("--peer-warmup-frac", type=float, default=0.05)
    p.add_argument("--dl-norm-batches", type=int, default=100,
                   help="batches dictionary-learning's trainSAE averages for its norm factor")
    p.add_argument("--e2e", action="store_true", help="also end to end from text (item 6)")
    p.add_argument("--e2e-tokens", type=int, default=65536)
    p.add_argument("--e2e-rounds", type=int, default=1,
                   help="end to end: rounds of (sparsify, ours); medians in the table")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--ours-train", default="", help="JSON of TrainConfig overrides for ours, e.g. "
                   "'{\"normalize\": false}' (diagnosis; the table's rows use the defaults)")
    p.add_argument("--smoke", action="store_true",
                   help="1 round of 2 timed steps, 4-step epochs, 4096 eval tokens: proves every "
                        "implementation runs end to end, measures nothing")
    p.add_argument("--out", default="runs/bench-train-speed")
    args = p.parse_args()
    if args.ours_train:
        OURS_TRAIN.update(json.loads(args.ours_train))
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 2, 1
        args.epoch_tokens = args.epoch_tokens or 4 * args.batch_size
        args.eval_tokens, args.dl_norm_batches, args.e2e_tokens = 4096, 2, min(args.e2e_tokens, 8192)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = find_cache(args)
    d = cache.widths[args.hookpoint]
    for impl in args.impls:
        if impl != "ours":
            ensure_env(impl)
    print(f"cache {cache.folder} ({len(cache):,} tokens, d={d}); {args.n_features} features, k={args.k}, "
          f"batch {args.batch_size}, {args.threads} threads", flush=True)
    runs, gemm = speed(args, cache, d)
    best = {}
    if not args.no_quality:
        ev = eval_cache(cache, args.eval_tokens, args.hookpoint)
        best = quality(args, cache, ev.read(args.hookpoint, 0, len(ev)), out)
    rows = table(args, runs, gemm, best, d) if args.rounds > 0 else []
    e2e_rows = e2e(args, cache, out) if args.e2e else []
    clean = {k: {kk: vv for kk, vv in v.items() if kk != "tried"} | {"tried": v.get("tried", [])}
             for k, v in best.items()}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "gemm_gflops": gemm, "runs": runs,
                                                  "quality": clean, "table": rows, "e2e": e2e_rows},
                                                 indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
