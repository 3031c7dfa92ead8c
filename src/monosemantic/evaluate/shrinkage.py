"""Fixing shrinkage ("feature suppression", Wright & Sharkey 2024) after training.

A sparsity penalty makes the encoder undershoot: active features fire too weakly and the
reconstruction is too short (relative reconstruction bias below 1). The fix here is a closed-form
least-squares refit of the active features' magnitudes with the encoder and decoder directions
frozen: find per-feature gains s minimising

    sum_tokens || y - b_dec - skip(x) - sum_i s_i a_i W_dec_i ||^2

whose normal equations are  (A^T A  o  W_dec W_dec^T) s = A^T ((y - b_dec - skip) W_dec^T)
(o is the elementwise product; A [N, F] the activations), solved with a small ridge toward s = 1.
The gains are folded into the encoder (and thresholds) so the coder keeps unit-norm decoder rows
and needs no extra state. The top-k family compares features with each other when selecting, so
it gets a single common gain (the same least squares with all s_i equal), which leaves every
selection unchanged.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

from ..coders import SparseCoder

MIN_GAIN = 1e-3


class Refit(NamedTuple):
    coder: SparseCoder
    """A refitted copy; the input coder is left unchanged."""
    gains: Tensor
    """[F] the gain folded into each feature (1 for features that never fired)."""


@torch.no_grad()
def refit_magnitudes(coder: SparseCoder, x: Tensor, y: Tensor | None = None,
                     ridge: float = 1e-4) -> Refit:
    """Least-squares refit of feature magnitudes on activations x [N, D_in] (targets y for a
    transcoder; an SAE's target is x)."""
    y = x if y is None else y
    enc = coder.encode(x)
    a = enc.acts
    w = coder.W_dec
    base = coder.b_dec + (coder.skip(x) if coder.cfg.kind == "skip_transcoder" else 0.0)
    r = y - base
    per_feature = coder.cfg.k is None
    if per_feature:
        gram = (a.T @ a) * (w @ w.T)
        rhs = ((a.T @ r) * w).sum(1)
        fired = a.gt(0).any(0)
        diag = gram.diagonal()
        reg = ridge * diag.mean().clamp_min(1e-12)
        gram = gram + torch.diag(torch.where(fired, reg, torch.ones_like(diag)))
        rhs = rhs + torch.where(fired, reg, torch.ones_like(diag))  # ridge toward s_i = 1
        gains = torch.linalg.solve(gram.double(), rhs.double()).to(w.dtype).clamp_min(MIN_GAIN)
        gains = torch.where(fired, gains, torch.ones_like(gains))
    else:
        recon = a @ w
        gamma = (recon * r).sum() / recon.pow(2).sum().clamp_min(1e-12)
        gains = torch.full((w.shape[0],), float(gamma.clamp_min(MIN_GAIN)), dtype=w.dtype, device=w.device)
    new = copy.deepcopy(coder)
    new._rescale_features(gains)
    return Refit(new, gains)



def collect_activations(lm, documents: list[str], hookpoints: list[str], n_tokens: int,
                        ctx_len: int = 256, batch_size: int = 8,
                        exclude_ids: list[int] | None = None) -> dict[str, Tensor]:
    """About n_tokens kept-token activations [N, D] per hookpoint, harvested in one pass."""
    from ..data.activations import harvest

    parts: dict[str, list[Tensor]] = {h: [] for h in hookpoints}
    seen = 0
    for chunk in harvest(lm.model, lm.tokenizer, documents, hookpoints, ctx_len, lm.bos_token_id,
                         batch_size, list(exclude_ids or [])):
        for h in hookpoints:
            parts[h].append(chunk.acts[h])
        seen += len(chunk)
        if seen >= n_tokens:
            break
    return {h: torch.cat(v)[:n_tokens] for h, v in parts.items()}
