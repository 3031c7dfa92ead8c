"""ReLU coder: the original SAE (Bricken et al. 2023, "Towards monosemanticity"), with the penalty of
Anthropic's "Circuits updates, April 2024".

acts = ReLU(pre_acts). Sparsity comes from the penalty: "l1" = sum_i a_i ||W_dec_i|| (weighting by
the decoder norm removes the incentive to shrink activations and grow decoder rows, so the decoder
need not be constrained to unit norm), or "lp" = sum_i ((a_i ||W_dec_i|| + eps)^p - eps^p), whose
eps (`base.LP_EPS`) bounds the gradient of p < 1 near zero.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from monosemantic.coders.base import SparseCoder
from monosemantic.coders.registry import register


@register("relu")
class ReLUCoder(SparseCoder):
    penalties = ("l1", "lp", "none")
    default_penalty = "l1"

    def _activate(self, pre_acts: Tensor) -> Tensor:
        return F.relu(pre_acts)
