"""Gated coder (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
autoencoders").

The encoder separates which features fire from how strongly, sharing one matrix W_gate = W_enc:
    h        = (x - b_dec) @ W_enc.T                   (an SAE; a transcoder uses x)
    pi_gate  = h + b_gate                              (b_gate is stored as b_enc)
    pi_mag   = exp(r_mag) * h + b_mag
    acts     = 1[pi_gate > 0] * ReLU(pi_mag)
The step passes no gradient, so the gate learns only through
    sparsity_loss = sum_i ReLU(pi_gate)_i ||W_dec_i||   (or the lp form), mean over the batch,
    aux_loss      = || target - (ReLU(pi_gate) @ W_dec.detach() + b_dec.detach() [+ skip.detach()]) ||^2,
                    summed over the output and averaged over the batch (the paper's L_aux),
where target is x for an SAE. A transcoder's target must be passed as forward(x, target=y); without
it the aux loss cannot be computed and is reported as 0 (with a one-time warning).
pre_acts in the outputs is pi_gate.

The decoder is kept at unit norm during training, as in the paper and in dictionary_learning's
GatedSAETrainer (ConstrainedAdam). With free decoder norms the decoder-norm-weighted penalty pushes
||W_dec_i|| down while the aux loss, which sees the decoder frozen, can only answer by inflating
pi_gate: the norms collapse, the gate opens everywhere and training diverges (measured on the toy
data: L0 of 120 of 128 features).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monosemantic.coders.base import EncoderOutput, SparseCoder
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.registry import register

logger = logging.getLogger(__name__)


@register("gated")
class GatedCoder(SparseCoder):
    penalties = ("l1", "lp", "none")
    default_penalty = "l1"
    unit_norm_decoder = True  # see the module docstring

    def __init__(self, cfg: CoderConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(cfg, device=device, dtype=dtype)
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_features, device=device, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_features, device=device, dtype=dtype))
        self._warned = False

    def encode(self, x: Tensor) -> EncoderOutput:
        if self.cfg.kind == "sae":
            x = x - self.b_dec
        h = x @ self.W_enc.T
        pi_gate = h + self.b_enc
        pi_mag = self.r_mag.exp() * h + self.b_mag
        return EncoderOutput((pi_gate > 0) * F.relu(pi_mag), pi_gate)

    def _penalised(self, acts: Tensor, pre_acts: Tensor) -> Tensor:
        return F.relu(pre_acts)

    def aux_loss(self, x: Tensor, enc: EncoderOutput, target: Tensor | None) -> Tensor:
        if target is None:
            if self.cfg.kind != "sae":
                if not self._warned:
                    logger.warning("gated %s: forward(x) without target= cannot compute the aux "
                                   "loss; it is 0. Pass forward(x, target=y) when training",
                                   self.cfg.kind)
                    self._warned = True
                return enc.pre_acts.new_zeros(())
            target = x
        recon = F.relu(enc.pre_acts) @ self.W_dec.detach() + self.b_dec.detach()
        skip = self.skip(x)
        if skip is not None:
            recon = recon + skip.detach()
        return (target - recon).pow(2).sum(-1).mean()

    @torch.no_grad()
    def _reset_feature_state(self, idx: Tensor, source_pre_acts: Tensor | None) -> None:
        self.r_mag[idx] = 0.0  # pi_mag = h: the magnitude is the projection onto the new row
        self.b_mag[idx] = 0.0
        if source_pre_acts is not None:
            # With a zero gate bias a resampled feature opens on every input on the positive side
            # of its direction, about half of them, and the penalty closes it for good long before
            # the rare input it was drawn for comes back. Open it only on inputs at least half as
            # aligned as that one (JumpReLU's rule); the magnitude path keeps the full projection.
            self.b_enc[idx] = -0.5 * source_pre_acts.clamp_min(0).to(self.b_enc)

    @torch.no_grad()
    def _set_encoder(self, W_enc: Tensor, b_enc: Tensor) -> None:
        super()._set_encoder(W_enc, b_enc)
        self.r_mag.zero_()
        self.b_mag.copy_(b_enc)  # pi_mag = pi_gate at init

    @torch.no_grad()
    def _rescale_encoder(self, c: Tensor) -> None:
        super()._rescale_encoder(c)  # scales h and b_gate, hence pi_gate
        self.b_mag.mul_(c)  # with h scaled, this scales pi_mag
