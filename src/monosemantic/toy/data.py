"""Toy data in superposition with known ground-truth features, after Sharkey, Braun & Millidge 2022,
"Taking features out of superposition with sparse autoencoders" (LessWrong interim report).

Generation:
1. N ground-truth features: Gaussian vectors in D dimensions, normalised to unit length ([N, D]).
2. Firing probabilities decay exponentially with the feature index, p_i = min(1, s * decay^i),
   with the scale s found by bisection so that sum_i p_i = mean_active exactly (the expected number
   of active features per sample is a parameter, not a by-product of the normalisation).
3. Which features fire:
   - uncorrelated: independently, feature i with probability p_i;
   - correlated (Gaussian copula; the report draws correlated firing through a random covariance
     matrix): features are split at random into groups; feature i has the latent
     z_i = a_i u_g + sqrt(1 - a_i^2) e_i, with u_g the shared factor of its group g and e_i its own
     noise (all N(0, 1)), so z ~ N(0, Sigma) with Sigma a random correlation matrix (a_i a_j within
     a group, 0 across). Feature i fires when z_i > Phi^-1(1 - p_i), so its marginal probability
     is still exactly p_i while features of one group fire together.
4. Each active feature gets a magnitude drawn from uniform(0, 1) (as in the report) or 1.
5. A sample is x = sum_i c_i f_i: x = coefficients @ features.

Shapes: n samples, N ground-truth features, D dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

MAGNITUDES = ("uniform", "constant")


@dataclass(frozen=True)
class ToyConfig:
    """Ground-truth superposition data; defaults follow the report (h=256, G=512, lambda=0.99)."""

    d: int = 256
    """Dimensions D of the data (the space the features are superposed in)."""
    n_features: int = 512
    """Number N of ground-truth features."""
    mean_active: float = 5.0
    """Expected number of active features per sample (sum of the firing probabilities)."""
    decay: float = 0.99
    """Firing probabilities fall as decay^index before scaling; 1: all features equally likely."""
    correlated: bool = False
    """Draw firing through a Gaussian copula so that features in one group fire together."""
    n_groups: int = 16
    """Number of random correlation groups (used when correlated)."""
    correlation: float = 0.8
    """Within-group latent correlation scale: two features of one group have latent correlation
    between correlation/2 and correlation (used when correlated)."""
    magnitude: str = "uniform"
    """Coefficient of an active feature: 'uniform' draws from uniform(0, 1), 'constant' uses 1."""
    seed: int = 0
    """Seed for the features, probabilities, groups and (unless a generator is passed) sampling."""

    def __post_init__(self) -> None:
        if self.d < 1:
            raise ValueError(f"d={self.d}; pass a positive number of dimensions")
        if self.n_features < 1:
            raise ValueError(f"n_features={self.n_features}; pass a positive number of features")
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(f"mean_active={self.mean_active}; pass a value in (0, n_features="
                             f"{self.n_features}] (it is the expected count of active features)")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay={self.decay}; pass a value in (0, 1] (1: no decay)")
        if not 1 <= self.n_groups <= self.n_features:
            raise ValueError(f"n_groups={self.n_groups}; pass a value in [1, n_features="
                             f"{self.n_features}]")
        if not 0 <= self.correlation < 1:
            raise ValueError(f"correlation={self.correlation}; pass a value in [0, 1)")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude={self.magnitude!r}; pass one of {MAGNITUDES}")


def firing_probabilities(n_features: int, mean_active: float, decay: float) -> torch.Tensor:
    """[N] p_i = min(1, s * decay^i) with s chosen so that sum p_i = mean_active (float64)."""
    log_decay = math.log(decay)
    idx = torch.arange(n_features, dtype=torch.float64)

    def probs(log_s: float) -> torch.Tensor:
        return (log_s + idx * log_decay).exp().clamp(max=1.0)

    # Without clamping s = mean_active / sum decay^i; clamping only lowers the sum, so s lies
    # between that and the scale at which every probability is 1.
    lo = math.log(mean_active) - torch.logsumexp(idx * log_decay, 0).item()
    hi = max(lo, -(n_features - 1) * log_decay)
    for _ in range(200):
        mid = (lo + hi) / 2
        if probs(mid).sum().item() < mean_active:
            lo = mid
        else:
            hi = mid
    return probs(hi)


class ToySample(NamedTuple):
    x: torch.Tensor
    """[n, D] samples."""
    coefficients: torch.Tensor
    """[n, N] ground-truth feature coefficients (0 where a feature is inactive)."""


class ToyData:
    """Ground-truth features and a sampler of data made of them (see the module docstring)."""

    def __init__(self, config: ToyConfig) -> None:
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        n = config.n_features
        self.features = torch.nn.functional.normalize(torch.randn(n, config.d, generator=g), dim=-1)
        """[N, D] unit-norm ground-truth directions."""
        self.probs = firing_probabilities(n, config.mean_active, config.decay).float()
        """[N] marginal firing probability of each feature."""
        if config.correlated:
            self.groups = torch.randperm(n, generator=g) % config.n_groups
            weight = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
            self.loadings = (config.correlation * weight).sqrt()
        else:
            self.groups = torch.arange(n)
            self.loadings = torch.zeros(n, dtype=torch.float64)
        # Fires when z_i > Phi^-1(1 - p_i); float64 so that p_i near 0 or 1 keep their thresholds.
        self._thresholds = torch.special.ndtri(1 - self.probs.double())
        self._sampler = torch.Generator().manual_seed(config.seed + 1)

    def correlation_matrix(self) -> torch.Tensor:
        """[N, N] the latent correlation matrix Sigma (identity when uncorrelated)."""
        same = self.groups[:, None] == self.groups[None, :]
        sigma = torch.where(same, self.loadings[:, None] * self.loadings[None, :], 0.0)
        return sigma.fill_diagonal_(1.0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> ToySample:
        """Draw n samples. Without a generator, the data's own seeded stream is used (so a fresh
        ToyData with the same config yields the same sequence of batches)."""
        if n < 0:
            raise ValueError(f"n={n}; pass a non-negative number of samples")
        g = self._sampler if generator is None else generator
        cfg = self.config
        if cfg.correlated:
            shared = torch.randn(n, cfg.n_groups, generator=g, dtype=torch.float64)
            own = torch.randn(n, cfg.n_features, generator=g, dtype=torch.float64)
            z = self.loadings * shared[:, self.groups] + (1 - self.loadings ** 2).sqrt() * own
            active = z > self._thresholds
        else:
            active = torch.rand(n, cfg.n_features, generator=g) < self.probs
        if cfg.magnitude == "uniform":
            coefficients = active * torch.rand(n, cfg.n_features, generator=g)
        else:
            coefficients = active.float()
        return ToySample(coefficients @ self.features, coefficients)
