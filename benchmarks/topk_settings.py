"""Which of TopK's training settings (unit input scale, uncalibrated encoder, no gradient clip)
suit BatchTopK: every variant trained in one pass over the 500k-token layer-15 cache in the
architecture table's setting (2,304 features, batch 1,024, lr 1e-3, 488 steps, k = 50), scored by
FVU over all tokens and without outliers on the eval split's cached activations.

    python benchmarks/topk_settings.py --seed 0 --out runs/diag-btk-s0

Needs the caches `benchmarks/train_speed.py` uses (the 500k train cache and the 32,768-token eval
cache of model.layers.15); 12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from monosemantic.data.cache import list_caches
from monosemantic.train import CoderSpec, TrainConfig, Trainer

OLD = dict(input_norm=0.0, calibrate_init=True, grad_clip=1.0)
VARIANTS = {
    ("batchtopk", "new"): dict(input_norm=1.0, calibrate_init=False, grad_clip=0.0),
    ("batchtopk", "old"): OLD,
    ("batchtopk", "new+cal"): dict(input_norm=1.0, calibrate_init=True, grad_clip=0.0),
    ("batchtopk", "new+clip"): dict(input_norm=1.0, calibrate_init=False, grad_clip=1.0),
    ("batchtopk", "new+sqrtD"): dict(input_norm=0.0, calibrate_init=False, grad_clip=0.0),
    ("topk", "new"): dict(input_norm=1.0, calibrate_init=False, grad_clip=0.0),
    ("topk", "old"): OLD,
}


def _cache(split: str, n: int):
    for c in list_caches():
        r = c.request
        if (r.model, r.corpus, r.split, c.complete) == ("smollm2-135m", "wiki-vital", split, True) \
                and "model.layers.15" in r.hookpoints and len(c) >= n:
            return c
    raise SystemExit(f"no complete {split} cache of model.layers.15 with {n} tokens: run "
                     "benchmarks/train_speed.py once first")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--out", default="runs/topk-settings")
    args = p.parse_args()
    cache, ev = _cache("train", 500_000), _cache("eval", 32_768)
    x = ev.read("model.layers.15", 0, 32_768)
    specs = [CoderSpec(f"{act}-k{args.k}-{name}", "model.layers.15",
                       TrainConfig(activation=act, k=args.k, expansion=4, tokens=500_000, batch_size=1024,
                                   lr=1e-3, seed=args.seed, **v))
             for (act, name), v in VARIANTS.items()]
    out = Path(args.out)
    coders = Trainer(specs, cache.widths, out).fit(
        lambda s: cache.batches(1024, seed=args.seed, start_step=s))
    norms = x.norm(dim=1)
    typical = norms <= 10 * norms.median()  # the metrics table's outlier rule
    results = {}
    with torch.no_grad():
        for name, coder in coders.items():
            err = (coder(x).out - x).pow(2).sum(1)
            xt = x[typical]
            results[name] = {"fvu": float(err.sum() / (x - x.mean(0)).pow(2).sum()),
                             "fvu w/o outliers": float(err[typical].sum() / (xt - xt.mean(0)).pow(2).sum())}
            print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
