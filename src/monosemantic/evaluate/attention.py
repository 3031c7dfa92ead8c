"""Coders on attention: which heads each feature writes through.

An attention block's heads are concatenated [.., H x hd] at the input of its output projection
(`models.attention_site`: o_proj for Llama, attn.c_proj for GPT-2, found by module name). For a
coder writing there, feature i's decoder row splits into H slices, and its head attribution is the
share of the row's squared norm in each slice:

    share[i, h] = ||W_dec[i, h*hd:(h+1)*hd]||^2 / ||W_dec[i]||^2.

For a coder writing the block's output (the projection's output, width D), the row d is first
carried back through the projection W_o [D, H*hd]: z = the minimum-norm solution of W_o z = d,
head h's part of the write is W_o[:, h] z_h, and

    share[i, h] = ||W_o[:, h] z_h||^2 / sum_h' ||W_o[:, h'] z_h'||^2,

so a direction one head can write alone (d = W_o[:, h] v) is attributed wholly to that head
whenever W_o has full column rank.

Shapes: F features, H heads, hd head dim, D model width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..coders import SparseCoder
from ..hooks import Hookpoint
from ..models import AttentionSite, attention_site, projection_matrix


def head_shares_of_heads_decoder(W_dec: Tensor, n_heads: int) -> Tensor:
    """[F, H*hd] decoder rows over concatenated heads -> [F, H] shares of squared norm."""
    sq = W_dec.float().reshape(W_dec.shape[0], n_heads, -1).pow(2).sum(-1)
    return sq / sq.sum(-1, keepdim=True).clamp_min(1e-30)


def head_shares_through_projection(W_dec: Tensor, W_o: Tensor, n_heads: int) -> Tensor:
    """[F, D] decoder rows in the block's output space and the projection W_o [D, H*hd] ->
    [F, H] shares of each head's part of the minimum-norm preimage, measured after W_o."""
    W_o = W_o.double()
    z = torch.linalg.lstsq(W_o, W_dec.double().T, driver="gelsd").solution.T  # [F, H*hd]
    hd = W_o.shape[1] // n_heads
    parts = torch.stack([z[:, h * hd:(h + 1) * hd] @ W_o[:, h * hd:(h + 1) * hd].T
                         for h in range(n_heads)], 1)  # [F, H, D]
    sq = parts.pow(2).sum(-1)
    return (sq / sq.sum(-1, keepdim=True).clamp_min(1e-30)).float()


class HeadReport(NamedTuple):
    """Head attributions of one coder's features."""

    site: AttentionSite
    written: str
    """'heads' (the projection's input) or 'output' (the block's output)."""
    shares: Tensor
    """[F, H] each feature's share per head (rows sum to 1)."""
    top: list[dict]
    """The most frequent features: feature, density, head (the largest share), share, shares."""
    single_head_fraction: float
    """Among features that fired, the fraction with one head holding > 0.9 of the share."""


def attention_written(coder: SparseCoder, model: nn.Module) -> tuple[AttentionSite, str] | None:
    """(site, 'heads' | 'output') when the coder writes an attention block's heads or output."""
    hp = coder.cfg.out_hookpoint or coder.cfg.hookpoint
    try:
        site = attention_site(model, Hookpoint.parse(hp).module)
    except ValueError:
        return None
    if hp == site.heads_hookpoint:
        return site, "heads"
    if hp in (site.output_hookpoint, site.module):
        return site, "output"
    return None


@torch.no_grad()
def head_report(coder: SparseCoder, model: nn.Module, density: Tensor | None = None,
                top: int = 10) -> HeadReport | None:
    """Head attributions of `coder`'s features, or None when it does not write an attention
    block; `top` features by `density` (firing frequency, [F]) are listed."""
    found = attention_written(coder, model)
    if found is None:
        return None
    site, written = found
    if written == "heads":
        shares = head_shares_of_heads_decoder(coder.W_dec, site.n_heads)
    else:
        W_o = projection_matrix(model.get_submodule(site.out_proj))
        shares = head_shares_through_projection(coder.W_dec, W_o, site.n_heads)
    density = density if density is not None else torch.ones(shares.shape[0])
    order = torch.argsort(density, descending=True)[:top]
    rows = [{"feature": int(i), "density": float(density[i]), "head": int(shares[i].argmax()),
             "share": float(shares[i].max()), "shares": [round(float(s), 4) for s in shares[i]]}
            for i in order]
    alive = density > 0
    single = float((shares[alive].max(-1).values > 0.9).float().mean()) if alive.any() else 0.0
    return HeadReport(site, written, shares, rows, single)
