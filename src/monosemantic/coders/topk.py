"""TopK coder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

acts = ReLU of the k largest pre-activations of each row, every other feature 0, so each token has
at most k active features and the sparsity needs no penalty. The ReLU after the selection keeps
acts >= 0 when fewer than k pre-activations are positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from monosemantic.coders.base import SparseCoder
from monosemantic.coders.registry import register
from monosemantic.coders.sparse import Selection, TopKSelection


def topk_acts(pre_acts: Tensor, k: int) -> Tensor:
    """[B, F] -> [B, F]: ReLU of the k largest entries of each row, zeros elsewhere."""
    vals, idx = pre_acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_acts).scatter(-1, idx, F.relu(vals))


@register("topk")
class TopKCoder(SparseCoder):
    uses_k = True
    penalties = ("none",)
    default_penalty = "none"

    def _activate(self, pre_acts: Tensor) -> Tensor:
        return topk_acts(pre_acts, self.cfg.k)

    def selection(self) -> Selection:
        return TopKSelection(self.cfg.k)

    @torch.no_grad()
    def _rescale_features(self, c: Tensor) -> None:
        self._require_uniform(c, "the top-k selection compares features with each other")
        super()._rescale_features(c)
