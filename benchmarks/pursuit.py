"""Pursuit inference against the encoder on trained SAEs: FVU against L0, and time per token.

    OMP_NUM_THREADS=1 python benchmarks/pursuit.py benchmarks/results/e2e_comparison/local-s0/all/k{32,16,64,128} \
        --tokens 2048 --l0 8 16 32 64 --repeats 1 --out benchmarks/results/pursuit

reads the model and corpus from the first coder's run.json, harvests --tokens held-out (eval
split) activations at its hookpoint, and measures the FVU (variance about the mean; also without
the outlier tokens, by the first coder's training rule in its training.json), the realised L0, and
wall seconds per 1k tokens (the best of --repeats runs, one thread unless OMP_NUM_THREADS says
otherwise) for: each coder's own encoder (one point per coder: SAEs of several k trained on the
same data give the encoder's FVU/L0 curve), and pursuit (coders/pursuit.py: mp, gp) over the FIRST
coder's decoder at each target L0. Writes pursuit.json and pursuit.png (FVU against L0) under --out.
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
from monosemantic.utils import atomic_write_json


@torch.no_grad()
def measure(model, x: torch.Tensor, repeats: int, keep: torch.Tensor | None = None) -> dict:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(x)
        best = min(best, time.perf_counter() - start)
    row = {"fvu": float(fvu(out.out, x)), "l0": float((out.acts > 0).sum(-1).float().mean()),
           "s_per_1k_tokens": 1000 * best / x.shape[0]}
    if keep is not None:
        row["fvu_excl_outliers"] = float(fvu(out.out[keep], x[keep]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("coders", nargs="+", help="trained SAE folders (cfg.json) inside run folders; "
                   "pursuit runs over the first one's decoder, every one's encoder is measured")
    p.add_argument("--model", default="", help="default: the run's run.json")
    p.add_argument("--corpus", default="", help="default: the run's run.json (eval split)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--l0", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/pursuit")
    args = p.parse_args()
    folder = Path(args.coders[0])
    run = folder.parent / "run.json"
    source = json.loads(run.read_text())["source"] if run.exists() else {}
    if not (args.model or source.get("model")) or not (args.corpus or source.get("corpus")):
        raise SystemExit(f"{run} does not name the model and corpus; pass --model and --corpus")
    lm = load_model(args.model or source["model"])
    coders = {f: SparseCoder.load(f).eval() for f in args.coders}
    coder = coders[args.coders[0]]
    if any(c.cfg.hookpoint != coder.cfg.hookpoint for c in coders.values()):
        raise SystemExit("the coders read different hookpoints; pass coders of one hookpoint")
    docs = load_corpus(args.corpus or source["corpus"], "eval").documents
    x = collect_activations(lm, docs, [coder.cfg.hookpoint], args.tokens,
                            exclude_ids=special_token_ids(lm.tokenizer))[coder.cfg.hookpoint]
    info = folder / "training.json"
    keep = None
    if info.exists():  # the first coder's outlier rule, as the trainer and evaluation apply it
        t = json.loads(info.read_text())
        keep = x.norm(dim=-1) <= t["outlier_multiple"] * t["median_norm"]
    rows = [{"method": "encoder", "coder": Path(f).name, "target_l0": None,
             **measure(c, x, args.repeats, keep)} for f, c in coders.items()]
    for l0 in args.l0:
        for method in ("mp", "gp"):
            rows.append({"method": method, "coder": folder.name, "target_l0": l0,
                         **measure(with_inference(coder, method, l0), x, args.repeats, keep)})
            print(format_table(rows[-1:]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "pursuit.json", {"coders": args.coders, "tokens": int(x.shape[0]),
                                             "outliers": None if keep is None else int((~keep).sum()),
                                             "threads": torch.get_num_threads(), "rows": rows})
    print(format_table(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["fvu"] + (["fvu_excl_outliers"] if keep is not None else [])
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 3.5), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for i, method in enumerate(("encoder", "mp", "gp")):
            pts = sorted((r["l0"], r[col]) for r in rows if r["method"] == method)
            label = "encoders (one per coder)" if method == "encoder" else f"{method} over {folder.name}"
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=label, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("L0")
        ax.set_ylabel("FVU" if col == "fvu" else "FVU without outlier tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pursuit.png", dpi=120)


if __name__ == "__main__":
    main()
