"""Dead features: tracked in tokens since each feature last fired, and revived.

Top-k family: AuxK (Gao et al. 2024), in the loss (see `SparseCoder.auxk_loss`).
Penalty family: resampling (Bricken et al. 2023, "Towards monosemanticity", and Anthropic's later
simplification): each dead feature is pointed at an input the coder reconstructs badly, drawn with
probability proportional to its squared error; its decoder row becomes that input's residual
direction, its encoder row the same direction at 0.2 x the mean alive encoder norm, its bias 0,
and its Adam moments are reset.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class DeadTracker:
    """Counts, per feature, the tokens since it last fired."""

    def __init__(self, n_features: int, dead_tokens: int):
        self.since_fired = torch.zeros(n_features, dtype=torch.int64)
        self.dead_tokens = dead_tokens
        self.reduce: Callable[[Tensor, int], tuple[Tensor, int]] | None = None
        """Set by data-parallel training (train/distributed.py): this rank's (fired, n_tokens) ->
        the whole batch's, so every rank keeps the same counters."""

    def update(self, acts: Tensor) -> None:
        """acts [B, F]: the batch's dense activations."""
        self.update_fired((acts > 0).any(0), acts.shape[0])

    def update_fired(self, fired: Tensor, n_tokens: int) -> None:
        """fired [F] bool: which features fired in a batch of n_tokens."""
        if self.reduce is not None:
            fired, n_tokens = self.reduce(fired, n_tokens)
        self.since_fired += n_tokens
        self.since_fired[fired.cpu()] = 0

    @property
    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_tokens

    @property
    def dead_fraction(self) -> float:
        return float(self.dead_mask.float().mean())


@torch.no_grad()
def resample_dead(coder, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, dead: Tensor,
                  generator: torch.Generator) -> int:
    """Re-point dead features at what the coder misses on badly reconstructed inputs of this
    batch; return how many.

    Inputs are drawn without replacement (with, when there are more dead features than inputs)
    with probability proportional to their squared error. Each dead feature's decoder row becomes
    the drawn input's residual direction (target - output). Its encoder row reads the same
    direction for an SAE (the residual lives in the input space; a rare feature the coder misses is
    exactly the residual of the inputs holding it) and the input's direction for a transcoder.
    Encoder rows get the mean alive encoder norm, times 0.2 for the penalty family (so a new
    feature does not fire everywhere at once, Bricken et al. 2023) and 1 for the top-k family (a
    new feature must win the selection to learn at all). Biases are 0; thresholds and gates are
    reset by the architecture (`reset_features`, which is given each drawn input); Adam moments
    of every per-feature parameter are zeroed for those rows."""
    idx = dead.nonzero(as_tuple=True)[0].to(coder.W_enc.device)
    if len(idx) == 0:
        return 0
    out = coder(x).out
    err = (out - y).pow(2).sum(-1)
    if float(err.sum()) <= 0:
        return 0
    weights = (err / err.sum()).cpu()
    replace = len(idx) > int((weights > 0).sum())
    pick = torch.multinomial(weights, len(idx), replacement=replace, generator=generator).to(x.device)
    residual = y[pick] - out[pick]
    direction_out = residual / residual.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if coder.cfg.kind == "sae":
        direction_in = direction_out
    else:
        direction_in = x[pick] / x[pick].norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead.to(coder.W_enc.device)
    enc_norm = coder.W_enc[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
    dec_norm = coder.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
    enc_scale = 1.0 if coder.uses_k else 0.2
    coder.reset_features(idx, direction_in * enc_scale * enc_norm, direction_out * dec_norm,
                         source=x[pick])
    for p in coder.per_feature_parameters():
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0.0
    log.info("resampled %d dead features", len(idx))
    return len(idx)
