"""Which of TopK's training settings (unit input scale, uncalibrated encoder, no gradient clip)
suit BatchTopK: every variant trained in one pass over the 500k-token layer-15 cache in the
architecture table's setting (2,304 features, batch 1,024, lr 1e-3, 488 steps, k = 50), scored by
FVU over all tokens and without outliers on the eval split's cached activations.

    python benchmarks/topk_settings.py --seed 0 --out runs/diag-btk-s0

Uses the caches of `benchmarks/train_speed.py` (its 500k-token train cache of model.layers.15, and
the 32,768-token eval cache it builds once) and its metrics; 12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train_speed import eval_cache, evaluate, find_cache  # the speed table's caches and metrics

from monosemantic.train import CoderSpec, TrainConfig, Trainer

HOOKPOINT = "model.layers.15"
OLD = dict(input_norm=0.0, calibrate_init=True, grad_clip=1.0, recon_loss="mse")
"""The settings every architecture trained with before TopK's own (sqrt(D) scale, calibrated
encoder, clip 1, squared-error loss)."""
UNIT = dict(input_norm=1.0, calibrate_init=False, grad_clip=0.0, recon_loss="mse", init_encoder_norm=1.0)
"""TopK's settings of 7f0f48f (unit scale, W_enc = W_dec at unit norm, no clip)."""
FVU = dict(UNIT, recon_loss="fvu", init_encoder_norm=3 ** -0.5)
"""TopK's settings since: sparsify's per-batch FVU loss and nn.Linear's encoder scale."""
VARIANTS = {
    ("batchtopk", "new"): UNIT,
    ("batchtopk", "old"): OLD,
    ("batchtopk", "new+cal"): dict(UNIT, calibrate_init=True, init_encoder_norm=None),
    ("batchtopk", "new+clip"): dict(UNIT, grad_clip=1.0),
    ("batchtopk", "new+sqrtD"): dict(UNIT, input_norm=0.0),
    ("topk", "new"): UNIT,
    ("topk", "old"): OLD,
    ("topk", "new+fvu+kaiming"): FVU,
    ("batchtopk", "old+fvu"): dict(OLD, recon_loss="fvu"),
    ("batchtopk", "new+fvu+kaiming"): FVU,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=[],
                   help="train only these (ARCH-NAME, e.g. topk-new batchtopk-old; default: all)")
    p.add_argument("--out", default="runs/topk-settings")
    args = p.parse_args()
    chosen = {key: v for key, v in VARIANTS.items() if not args.variants or "-".join(key) in args.variants}
    if args.variants and len(chosen) != len(args.variants):
        raise SystemExit(f"unknown variants in {args.variants}; pick from "
                         + ", ".join("-".join(key) for key in VARIANTS))
    cache = find_cache(argparse.Namespace(cache="", hookpoint=HOOKPOINT))
    ev = eval_cache(cache, 32_768, HOOKPOINT)
    x = ev.read(HOOKPOINT, 0, len(ev))
    specs = [CoderSpec(f"{act}-k{args.k}-{name}", HOOKPOINT,
                       TrainConfig(activation=act, k=args.k, expansion=4, tokens=500_000, batch_size=1024,
                                   lr=1e-3, seed=args.seed, **v))
             for (act, name), v in chosen.items()]
    out = Path(args.out)
    coders = Trainer(specs, cache.widths, out).fit(
        lambda s: cache.batches(1024, seed=args.seed, start_step=s))
    results = {name: evaluate(coder, x) for name, coder in coders.items()}
    for name, r in results.items():
        print(name, {k: round(v, 4) for k, v in r.items()}, flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
