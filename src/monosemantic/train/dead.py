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
    """Re-point dead features at badly reconstructed inputs of this batch; return how many."""
    idx = dead.nonzero(as_tuple=True)[0].to(coder.W_enc.device)
    if len(idx) == 0:
        return 0
    err = (coder(x).out - y).pow(2).sum(-1)
    if float(err.sum()) <= 0:
        return 0
    pick = torch.multinomial(err.cpu() / err.sum().cpu(), len(idx), replacement=True,
                             generator=generator).to(x.device)
    centre = coder.b_dec if coder.cfg.kind == "sae" else 0.0
    direction_out = y[pick] - coder(x[pick]).out  # what the coder misses on those inputs
    direction_out = direction_out / direction_out.norm(dim=1, keepdim=True).clamp_min(1e-8)
    direction_in = x[pick] - centre
    direction_in = direction_in / direction_in.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead.to(coder.W_enc.device)
    enc_norm = coder.W_enc[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
    dec_norm = coder.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
    coder.W_dec[idx] = direction_out * dec_norm
    coder.W_enc[idx] = direction_in * 0.2 * enc_norm
    coder.b_enc[idx] = 0.0
    for p in (coder.W_enc, coder.b_enc, coder.W_dec):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0.0
    log.info("resampled %d dead features", len(idx))
    return len(idx)
