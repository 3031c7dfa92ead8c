"""Where a coder's all-token FVU goes: the massive-activation tokens against the rest.

On SmolLM2 layer 15 a handful of tokens (norm > 10x the median) carry most of the variance, so the
all-token FVU is mostly how well those few are reconstructed. For each coder folder (any layout
`coders.interop.load_any` reads), on the eval split train_speed.py scores with, this prints the
all-token FVU split into the outliers' and the other tokens' shares of the total variance, and the
outliers' mean relative error ||x - x_hat||^2 / ||x||^2.

    python benchmarks/outlier_error.py runs/q-n059-s1/quality/ours-x8/coder \\
        runs/q-seed1/quality/dictlearn-x8.01
"""

from __future__ import annotations

import argparse
import glob

import torch

from monosemantic.coders.interop import load_any
from monosemantic.data.cache import ActivationCache
from monosemantic.utils import cache_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("coders", nargs="+", help="coder folders")
    ap.add_argument("--hookpoint", default="model.layers.15")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="the eval cache to use, by size")
    ap.add_argument("--outlier-multiple", type=float, default=10.0)
    args = ap.parse_args()

    folders = sorted(glob.glob(str(cache_dir() / "activations" / "smollm2-135m-wiki-vital-eval-*")))
    caches = [c for c in map(ActivationCache, folders) if c.complete and len(c) == args.eval_tokens]
    if not caches:
        raise SystemExit(f"no complete {args.eval_tokens}-token wiki-vital eval cache under "
                         f"{cache_dir() / 'activations'}: run benchmarks/train_speed.py first")
    x = caches[0].read(args.hookpoint, 0, len(caches[0]))
    norm = x.norm(dim=1)
    out = norm > args.outlier_multiple * norm.median()
    total = (x - x.mean(0)).pow(2).sum()
    print(f"{len(x)} eval tokens, {int(out.sum())} outliers carrying "
          f"{float((x[out] - x.mean(0)).pow(2).sum() / total):.1%} of the variance")
    print(f"{'coder':60s} {'FVU':>7s} {'outliers':>9s} {'others':>7s} {'outlier rel err':>15s}")
    for folder in args.coders:
        coder = load_any(folder)
        with torch.no_grad():
            err = (coder(x).out - x).pow(2).sum(1)
        print(f"{folder:60s} {float(err.sum() / total):7.4f} {float(err[out].sum() / total):9.4f} "
              f"{float(err[~out].sum() / total):7.4f} {float((err[out] / norm[out] ** 2).mean()):15.4f}")


if __name__ == "__main__":
    main()
