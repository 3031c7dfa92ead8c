"""How well a coder's learned directions recover known ground-truth features.

Mean max cosine similarity (MMCS, Sharkey, Braun & Millidge 2022): normalise both sets of
directions, take the [F, N] cosine matrix, and
- `mmcs.true_to_learned`: for each TRUE feature, the best cosine with any learned direction,
  averaged over true features. This is the headline number: did every ground-truth feature get
  found?
- `mmcs.learned_to_true`: for each LEARNED direction, the best cosine with any true feature,
  averaged over learned directions: how many of the coder's features are ground-truth ones?
Cosines are signed (a learned direction pointing the opposite way does not recover the feature).
A true feature counts as recovered when its best cosine is at least a threshold (0.9 by default).

Shapes: F learned features, N ground-truth features, D dimensions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_


def _cosines(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    if learned.ndim != 2 or true.ndim != 2 or learned.shape[1] != true.shape[1]:
        raise ValueError(f"learned {tuple(learned.shape)} and true {tuple(true.shape)}: pass "
                         "directions as rows, learned [F, D] (decoder rows) and true [N, D]")
    return F_.normalize(learned.detach().float(), dim=-1) @ F_.normalize(true.float(), dim=-1).T


class MMCS(NamedTuple):
    true_to_learned: float
    """Mean over true features of the max cosine with any learned direction (the MMCS)."""
    learned_to_true: float
    """Mean over learned directions of the max cosine with any true feature."""


def mmcs(learned: torch.Tensor, true: torch.Tensor) -> MMCS:
    """Mean max cosine similarity in both directions; learned [F, D], true [N, D]."""
    cos = _cosines(learned, true)
    return MMCS(cos.max(0).values.mean().item(), cos.max(1).values.mean().item())


def best_matches(learned: torch.Tensor, true: torch.Tensor):
    """For each true feature, its best cosine with any learned direction and that direction's
    index: a (values [N], indices [N]) pair."""
    return _cosines(learned, true).max(0)


def best_cosines(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """[N]: for each true feature, its best cosine with any learned direction."""
    return best_matches(learned, true).values


def octile_means(values: torch.Tensor, parts: int = 8) -> list[float]:
    """Means of `values` over `parts` equal consecutive slices (true features are ordered by
    firing probability, commonest first, so slice 0 is the commonest eighth)."""
    return [float(c.mean()) for c in torch.tensor_split(values.float(), parts)]


def fraction_recovered(learned: torch.Tensor, true: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of true features whose best cosine with a learned direction is >= threshold."""
    return (_cosines(learned, true).max(0).values >= threshold).float().mean().item()


class ToyRecovery(NamedTuple):
    mmcs: float
    """Mean over true features of the best cosine with a learned direction."""
    mmcs_learned: float
    """Mean over learned directions of the best cosine with a true feature."""
    frac_recovered: float
    """Fraction of true features recovered at the threshold."""
    n_dead: int | None
    """Learned features that never fired (None when no density was given)."""
    n_learned: int
    """Number F of learned directions."""


def toy_recovery(learned: torch.Tensor, true: torch.Tensor, density: torch.Tensor | None = None,
                 threshold: float = 0.9) -> ToyRecovery:
    """All recovery numbers at once; `density` [F] (from `metrics.feature_density` or
    `ReconstructionStats`) fills `n_dead`. Dead features still count in `mmcs_learned`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}; pass a cosine in (0, 1]")
    if density is not None and density.shape != learned.shape[:1]:
        raise ValueError(f"density has shape {tuple(density.shape)}; pass one value per learned "
                         f"feature, shape ({learned.shape[0]},)")
    both = mmcs(learned, true)
    n_dead = None if density is None else int((density <= 0).sum())
    return ToyRecovery(both.true_to_learned, both.learned_to_true,
                       fraction_recovered(learned, true, threshold), n_dead, learned.shape[0])
