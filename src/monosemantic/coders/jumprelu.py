"""JumpReLU coder (Rajamanoharan et al. 2024, "Jumping ahead: improving reconstruction fidelity with
JumpReLU sparse autoencoders").

acts_i = z_i * H(z_i - theta_i) with a learned per-feature threshold theta > 0 (H the Heaviside step,
z the pre-activations). H has zero gradient almost everywhere, so theta learns through
straight-through estimators with a rectangle kernel K(u) = 1[|u| < 1/2] of width eps
(`cfg.jumprelu_bandwidth`):
    d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps),   d JumpReLU / d z = H(z - theta)
    d H(z - theta) / d theta = -(1 / eps) K((z - theta) / eps),   d H / d z = 0
The "l0" penalty (the default) is the mean over the batch of sum_i H(z_i - theta_i), which is
how the paper trains sparsity; "l1"/"lp" weight acts by decoder norms as the ReLU coder does.

theta is stored directly, not as log(theta): under Adam a log parameterisation fails to learn
sparsity (SAELens PR #718). It is kept positive in the forward pass by a straight-through clamp
(value clamped to >= MIN_THRESHOLD, gradient passed unchanged) so a threshold pushed below zero
can still recover.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from monosemantic.coders.base import SparseCoder
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.registry import register
from monosemantic.coders.sparse import Selection, ThresholdSelection

MIN_THRESHOLD = 1e-6


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient [B, F] back to the threshold's shape [F]."""
    return grad.sum_to_size(like.shape)


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - theta), with the straight-through gradient for theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta)
        grad_theta = -(theta / eps) * _rectangle((z - theta) / eps) * grad
        return grad_z, _reduce_to(grad_theta, theta), None


class StepFn(torch.autograd.Function):
    """H(z - theta), with the straight-through gradient for theta and none for z."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * grad
        return torch.zeros_like(z), _reduce_to(grad_theta, theta), None


@register("jumprelu")
class JumpReLUCoder(SparseCoder):
    penalties = ("l0", "l1", "lp", "none")
    default_penalty = "l0"

    def __init__(self, cfg: CoderConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(cfg, device=device, dtype=dtype)
        self.threshold = nn.Parameter(
            torch.full((cfg.n_features,), float(cfg.jumprelu_init_threshold), device=device, dtype=dtype))

    def theta(self) -> Tensor:
        """[F] the threshold clamped to >= MIN_THRESHOLD, with a straight-through gradient."""
        t = self.threshold
        return t + (t.clamp_min(MIN_THRESHOLD) - t).detach()

    def _activate(self, pre_acts: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre_acts, self.theta(), self.cfg.jumprelu_bandwidth)

    def selection(self) -> Selection | None:
        """Inference only: training needs the straight-through gradients of the dense path."""
        if self.training:
            return None
        return ThresholdSelection(self.threshold.detach().clamp_min(MIN_THRESHOLD))

    @torch.no_grad()
    def _reset_feature_state(self, idx: Tensor, source_pre_acts: Tensor | None) -> None:
        # The median live threshold puts the new feature on the scale the others settled at, but
        # capped at half its pre-activation on the input it was drawn for: a resampled encoder row
        # is short (see `resample_dead`), so under the median it would never fire, and a JumpReLU
        # feature that never fires gets no encoder gradient and stays dead (on the toy data at 2N,
        # ~300 of 1024 features were resampled again at every resampling). With the cap, the toy
        # benchmark's JumpReLU at 2N, 1M tokens, went from MMCS 0.929 (44% dead) to 0.978 (20%).
        alive = torch.ones_like(self.threshold, dtype=torch.bool)
        alive[idx] = False
        ref = self.threshold[alive].median() if alive.any() else self.threshold.new_tensor(
            self.cfg.jumprelu_init_threshold)
        theta = ref.expand(len(idx))
        if source_pre_acts is not None:
            theta = torch.minimum(theta, 0.5 * source_pre_acts.to(theta))
        self.threshold[idx] = theta.clamp_min(MIN_THRESHOLD)

    def _l0_penalty(self, acts: Tensor, pre_acts: Tensor) -> Tensor:
        return StepFn.apply(pre_acts, self.theta(), self.cfg.jumprelu_bandwidth).sum(-1).mean()

    @torch.no_grad()
    def _rescale_features(self, c: Tensor) -> None:
        super()._rescale_features(c)
        self.threshold.mul_(c)

    def _after_fold_scale(self, out_scale: float) -> None:
        # pre-activations are now 1/out_scale times the training ones: so is the kernel width
        self.cfg = dataclasses.replace(self.cfg, jumprelu_bandwidth=self.cfg.jumprelu_bandwidth / out_scale)
