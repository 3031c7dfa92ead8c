"""BatchTopK coder (Bussmann et al. 2024, "BatchTopK sparse autoencoders").

Training mode: keep the k*B largest ReLU'd pre-activations of the whole batch [B, F] (and any tied
with the smallest of them), so tokens share a budget of k features on average instead of exactly k
each.
Inference cannot depend on the rest of the batch, so the coder learns a global threshold:
after every training-mode batch, under no_grad,
    threshold <- momentum * threshold + (1 - momentum) * (smallest positive kept activation)
(the first batch sets it directly; momentum = 0.99). Eval mode then uses the JumpReLU-like rule
    acts = pre_acts * (pre_acts > threshold),
whose L0 on the training distribution is close to k. `threshold` is a saved buffer; it is -1 until
the first training-mode batch, and an uncalibrated coder in eval mode falls back to batch top-k
with a warning.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from monosemantic.coders.base import SparseCoder
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.registry import register
from monosemantic.coders.sparse import (ActiveSet, BatchTopKSelection, Selection, ThresholdSelection,
                                        batch_threshold)

logger = logging.getLogger(__name__)

MOMENTUM = 0.99


@register("batchtopk")
class BatchTopKCoder(SparseCoder):
    uses_k = True
    penalties = ("none",)
    default_penalty = "none"

    def __init__(self, cfg: CoderConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(cfg, device=device, dtype=dtype)
        self.register_buffer("threshold", torch.tensor(-1.0, device=device, dtype=dtype))
        self._warned = False
        self.batch_reduce = None
        """Set during data-parallel training (train/distributed.py): makes the training-mode
        selection span every process's rows, (candidates, k, check) -> (tau, widen)."""

    def _batch_topk(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """[B, F] -> (acts [B, F], the kept values): every positive pre-activation at or above the
        (k*B)-th largest (ties included), over every process's rows in data-parallel training."""
        flat = F.relu(pre_acts).flatten()
        if self.batch_reduce is not None and self.training:
            tau, _ = self.batch_reduce(flat.detach().view_as(pre_acts), self.cfg.k, False)
        else:
            tau = batch_threshold(flat.detach(), self.cfg.k * pre_acts.shape[0])
        keep = (flat >= tau) & (flat > 0)
        return (flat * keep).view_as(pre_acts), flat[keep]

    def _activate(self, pre_acts: Tensor) -> Tensor:
        if self.training:
            acts, kept = self._batch_topk(pre_acts)
            self._update_threshold(kept.detach())
            return acts
        if self.threshold < 0:
            if not self._warned:
                logger.warning("BatchTopK threshold is uncalibrated (no training-mode batch yet); "
                               "falling back to batch top-k selection in eval mode")
                self._warned = True
            return self._batch_topk(pre_acts)[0]
        return pre_acts * (pre_acts > self.threshold)

    def selection(self) -> Selection:
        if self.training or self.threshold < 0:
            if not self.training and not self._warned:
                logger.warning("BatchTopK threshold is uncalibrated (no training-mode batch yet); "
                               "falling back to batch top-k selection in eval mode")
                self._warned = True
            return BatchTopKSelection(self.cfg.k, self.cfg.n_features,
                                      reduce=self.batch_reduce if self.training else None)
        return ThresholdSelection(self.threshold)

    def _after_sparse_encode(self, active: ActiveSet) -> None:
        if self.training:
            self._update_threshold(active.values.detach())

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        low = positive.min().to(self.threshold.dtype)
        if self.threshold < 0:
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(MOMENTUM).add_((1 - MOMENTUM) * low)

    @torch.no_grad()
    def _rescale_features(self, c: Tensor) -> None:
        self._require_uniform(c, "the batch selection and the single threshold compare features")
        super()._rescale_features(c)
        if self.threshold >= 0:
            self.threshold.mul_(c.mean())
