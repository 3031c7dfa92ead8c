"""Sparse inference over a trained decoder: matching pursuit and gradient pursuit.

An SAE's encoder is one amortised guess at the code; pursuit searches for it against the decoder
alone, with a target L0 (the number of greedy selections). Both variants are non-negative (SAE
features are), work on a batch at once with dense [B, F] correlations, and decode through the
coder's own decoder (W_dec, b_dec):

  matching pursuit (Mallat & Zhang 1993): r = x - b_dec; L0 times: pick the feature with the
      largest positive correlation <r, w_i> / ||w_i||, add that much of it, subtract from r
      (a feature may be picked again, so the final L0 can be below the target);
  gradient pursuit (Blumensath & Davies 2008, "Gradient pursuits"): L0 times: add the feature of
      largest positive correlation to the support S, then one steepest-descent step on
      ||r||^2 over the coefficients on S with the exact line search a = <r, c> / ||c||^2 where
      g = W_S r, c = g W_S; coefficients are clipped at 0. Then `refine` conjugate-gradient
      iterations on the final support (least squares on S, exact after |S| iterations in exact
      arithmetic), clipped at 0 again.

Cost: each selection is one [B, D] x [D, F] product, as much as one encoder pass; pursuit at
L0 = 32 costs about 32 + refine encoder passes (benchmarks/pursuit.py times it).

Shapes: B rows, D width, F features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import ForwardOutput, SparseCoder

METHODS = ("encoder", "mp", "gp")


class PursuitResult(NamedTuple):
    acts: Tensor
    """[B, F] non-negative coefficients."""
    out: Tensor
    """[B, D] acts @ W_dec + b_dec."""


def _unit(W_dec: Tensor) -> tuple[Tensor, Tensor]:
    norms = W_dec.norm(dim=1).clamp_min(1e-12)
    return W_dec / norms[:, None], norms


@torch.no_grad()
def matching_pursuit(x: Tensor, W_dec: Tensor, b_dec: Tensor, l0: int) -> PursuitResult:
    """Non-negative matching pursuit of x [B, D] over the rows of W_dec [F, D], `l0` selections."""
    U, norms = _unit(W_dec.float())
    r = x.float() - b_dec.float()
    coef = torch.zeros(x.shape[0], W_dec.shape[0], dtype=r.dtype, device=r.device)
    rows = torch.arange(x.shape[0], device=r.device)
    for _ in range(l0):
        corr = r @ U.T
        best, idx = corr.max(dim=1)
        best = best.clamp_min(0)  # nothing left with a positive correlation: add nothing
        coef[rows, idx] += best
        r -= best[:, None] * U[idx]
    acts = coef / norms  # coefficients of the unit rows -> of the decoder's own rows
    return PursuitResult(acts, acts @ W_dec.float() + b_dec.float())


@torch.no_grad()
def gradient_pursuit(x: Tensor, W_dec: Tensor, b_dec: Tensor, l0: int,
                     refine: int | None = None) -> PursuitResult:
    """Non-negative gradient pursuit of x [B, D] over the rows of W_dec [F, D]: `l0` selections,
    each followed by a line-searched gradient step on the support, then `refine` (default l0)
    conjugate-gradient iterations on the final support."""
    W = W_dec.float()
    U, norms = _unit(W)
    target = x.float() - b_dec.float()
    coef = torch.zeros(x.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    support = torch.zeros_like(coef, dtype=torch.bool)
    rows = torch.arange(x.shape[0], device=W.device)
    r = target.clone()
    for _ in range(l0):
        corr = r @ U.T
        best, idx = corr.masked_fill(support, float("-inf")).max(dim=1)
        support[rows[best > 0], idx[best > 0]] = True
        g = corr * support  # minus the gradient of ||r||^2 / 2, on the support
        c = g @ U
        a = (r * c).sum(1) / (c * c).sum(1).clamp_min(1e-20)
        coef = (coef + a[:, None] * g).clamp_min(0)
        r = target - coef @ U
    coef = _conjugate_gradient(coef, support, U, target, l0 if refine is None else refine)
    acts = coef / norms
    return PursuitResult(acts, acts @ W + b_dec.float())


def _conjugate_gradient(coef: Tensor, support: Tensor, U: Tensor, target: Tensor,
                        iters: int) -> Tensor:
    """min ||target - coef U||^2 over coef on `support`, from `coef`, by conjugate gradients on
    the normal equations (U_S U_S^T) coef = U_S target; clipped at 0 at the end."""
    mask = support.to(coef.dtype)
    r = ((target - coef @ U) @ U.T) * mask  # residual of the normal equations
    p = r.clone()
    rr = (r * r).sum(1)
    for _ in range(iters):
        Ap = ((p @ U) @ U.T) * mask
        alpha = rr / (p * Ap).sum(1).clamp_min(1e-30)
        coef = coef + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        new = (r * r).sum(1)
        p = r + (new / rr.clamp_min(1e-30))[:, None] * p
        rr = new
    return coef.clamp_min(0)


class PursuitCoder(nn.Module):
    """A trained SAE whose encoder is replaced by pursuit over its decoder, with the SparseCoder
    forward interface the evaluation reads (`cfg`, `dtype`, `forward(x).out/.acts`)."""

    def __init__(self, coder: SparseCoder, method: str, l0: int):
        super().__init__()
        if method not in ("mp", "gp"):
            raise ValueError(f"inference={method!r}: pursuit is mp or gp (or use the encoder)")
        if coder.cfg.kind != "sae":
            raise ValueError(f"pursuit codes a coder's own target, so it needs an SAE; this coder "
                             f"is a {coder.cfg.kind} (its target is unknown at inference)")
        if l0 < 1:
            raise ValueError(f"l0={l0}: pursuit needs a target L0 of at least 1 (--l0 N)")
        self.coder, self.method, self.l0 = coder, method, l0
        self.cfg = coder.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.coder.dtype

    def forward(self, x: Tensor, target: Tensor | None = None) -> ForwardOutput:
        fn = matching_pursuit if self.method == "mp" else gradient_pursuit
        res = fn(x, self.coder.W_dec, self.coder.b_dec, self.l0)
        zero = res.out.new_zeros(())
        return ForwardOutput(res.out.to(x.dtype), res.acts, res.acts, zero, zero)


def with_inference(coder: SparseCoder, method: str, l0: int = 0) -> nn.Module:
    """The coder itself for method 'encoder', else a PursuitCoder over its decoder."""
    if method not in METHODS:
        raise ValueError(f"inference={method!r}: use one of {', '.join(METHODS)}")
    return coder if method == "encoder" else PursuitCoder(coder, method, l0)
