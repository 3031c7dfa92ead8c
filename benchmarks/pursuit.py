"""Pursuit inference against the encoder on a trained SAE: FVU against L0, and time per token.

    OMP_NUM_THREADS=2 python benchmarks/pursuit.py runs/coder/model.layers.15 --tokens 4096 \
        --l0 8 16 32 64 --out benchmarks/results/pursuit

reads the model and corpus from the run's run.json, harvests --tokens held-out (eval split)
activations at the coder's hookpoint, and for the encoder (once, at its own L0) and each pursuit
method (coders/pursuit.py: mp, gp) at each target L0 measures the FVU (variance about the mean),
the realised L0, and wall seconds per 1k tokens (the best of --repeats runs, one thread unless
OMP_NUM_THREADS says otherwise). Writes pursuit.json and pursuit.png (FVU against L0) under --out.
Smoke run (a coder trained on the unit tests' tiny model):

    python benchmarks/pursuit.py /tmp/e2e-smoke/local-s0/all/k4 --tokens 512 --l0 2 4 8 --out /tmp/pursuit-smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from monosemantic.coders import SparseCoder
from monosemantic.coders.pursuit import with_inference
from monosemantic.data import load_corpus, special_token_ids
from monosemantic.evaluate.shrinkage import collect_activations
from monosemantic.metrics import format_table, fvu
from monosemantic.models import load_model


@torch.no_grad()
def measure(model, x: torch.Tensor, repeats: int) -> dict:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(x)
        best = min(best, time.perf_counter() - start)
    return {"fvu": float(fvu(out.out, x)), "l0": float((out.acts > 0).sum(-1).float().mean()),
            "s_per_1k_tokens": 1000 * best / x.shape[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("coder", help="a trained SAE's folder (cfg.json) inside a run folder")
    p.add_argument("--model", default="", help="default: the run's run.json")
    p.add_argument("--corpus", default="", help="default: the run's run.json (eval split)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--l0", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/pursuit")
    args = p.parse_args()
    folder = Path(args.coder)
    run = folder.parent / "run.json"
    source = json.loads(run.read_text())["source"] if run.exists() else {}
    lm = load_model(args.model or source["model"])
    coder = SparseCoder.load(str(folder)).eval()
    docs = load_corpus(args.corpus or source["corpus"], "eval").documents
    x = collect_activations(lm, docs, [coder.cfg.hookpoint], args.tokens,
                            exclude_ids=special_token_ids(lm.tokenizer))[coder.cfg.hookpoint]
    rows = [{"method": "encoder", "target_l0": None, **measure(coder, x, args.repeats)}]
    for l0 in args.l0:
        for method in ("mp", "gp"):
            rows.append({"method": method, "target_l0": l0,
                         **measure(with_inference(coder, method, l0), x, args.repeats)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pursuit.json").write_text(json.dumps({"coder": str(folder), "tokens": int(x.shape[0]),
                                                  "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(format_table(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, method in enumerate(("encoder", "mp", "gp")):
        pts = sorted((r["l0"], r["fvu"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), "o-", color=f"C{i}", label=method, ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("L0")
    ax.set_ylabel("FVU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pursuit.png", dpi=120)


if __name__ == "__main__":
    main()
