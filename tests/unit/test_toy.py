"""Toy superposition data: sampling statistics, determinism, and recovery metrics by hand."""

import math

import pytest
import torch

from monosemantic.toy import (ToyConfig, ToyData, firing_probabilities, fraction_recovered, mmcs,
                              toy_recovery)
from monosemantic.toy.recovery import best_cosines, octile_means


def test_mmcs_by_hand_in_two_dimensions():
    s = math.sqrt(0.5)
    true = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    learned = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # cosines: rows learned, cols true = [[1, 0], [s, s], [-1, 0]]
    both = mmcs(learned, true)
    assert both.true_to_learned == pytest.approx((1 + s) / 2)
    assert both.learned_to_true == pytest.approx((1 + s + 0) / 3)
    assert fraction_recovered(learned, true) == 0.5
    assert fraction_recovered(learned, true, threshold=0.7) == 1.0
    rec = toy_recovery(learned, true, density=torch.tensor([0.2, 0.0, 0.0]))
    assert rec.mmcs == pytest.approx((1 + s) / 2) and rec.frac_recovered == 0.5
    assert rec.n_dead == 2 and rec.n_learned == 3
    assert toy_recovery(learned, true).n_dead is None
    assert best_cosines(learned, true).tolist() == pytest.approx([1.0, s])


def test_octile_means_average_consecutive_slices():
    assert octile_means(torch.arange(16.0)) == [0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5]
    assert octile_means(torch.tensor([1.0, 3.0, 5.0]), parts=2) == [2.0, 5.0]


def test_recovery_of_the_true_features_is_perfect_and_sign_matters():
    data = ToyData(ToyConfig(d=8, n_features=16, mean_active=2))
    assert mmcs(data.features * 3, data.features).true_to_learned == pytest.approx(1.0)
    assert fraction_recovered(-data.features, data.features) == 0.0
    with pytest.raises(ValueError, match="as rows"):
        mmcs(data.features.T, data.features)


def test_features_are_unit_norm_and_probabilities_sum_to_mean_active():
    data = ToyData(ToyConfig(d=16, n_features=40, mean_active=3.5, decay=0.9))
    assert data.features.shape == (40, 16)
    assert data.features.norm(dim=-1).tolist() == pytest.approx([1.0] * 40, abs=1e-5)
    assert data.probs.sum().item() == pytest.approx(3.5, rel=1e-5)
    assert (data.probs[1:] <= data.probs[:-1]).all()
    assert data.probs[1].item() / data.probs[0].item() == pytest.approx(0.9, rel=1e-5)


def test_probabilities_clamp_at_one_and_still_sum_to_mean_active():
    p = firing_probabilities(10, 9.5, 0.5)
    assert p[:9].tolist() == pytest.approx([1.0] * 9) and p[9].item() == pytest.approx(0.5)
    assert firing_probabilities(5, 5.0, 0.3).tolist() == pytest.approx([1.0] * 5)


@pytest.mark.parametrize("correlated", [False, True])
def test_sampling_matches_mean_active_and_probabilities(correlated):
    cfg = ToyConfig(d=24, n_features=48, mean_active=4.0, decay=0.95, correlated=correlated,
                    n_groups=6, seed=3)
    data = ToyData(cfg)
    x, coef = data.sample(20_000)
    active = coef != 0
    assert x.shape == (20_000, 24) and coef.shape == (20_000, 48)
    assert active.sum(1).float().mean().item() == pytest.approx(4.0, rel=0.03)
    assert (active.float().mean(0) - data.probs).abs().max().item() < 0.015
    assert coef.max().item() <= 1.0 and coef.min().item() >= 0.0
    assert torch.allclose(x, coef @ data.features, atol=1e-5)


def _firing_correlations(active: torch.Tensor) -> torch.Tensor:
    a = active.double()
    a = (a - a.mean(0)) / a.std(0)
    return (a.T @ a) / (len(a) - 1)


def test_correlated_features_fire_together_within_groups_only():
    cfg = ToyConfig(d=16, n_features=24, mean_active=6.0, decay=1.0, correlated=True, n_groups=4,
                    correlation=0.8, seed=1)
    data = ToyData(cfg)
    corr = _firing_correlations(data.sample(20_000).coefficients != 0)
    same = data.groups[:, None] == data.groups[None, :]
    off_diag = ~torch.eye(24, dtype=torch.bool)
    within, across = corr[same & off_diag], corr[~same]
    assert within.min().item() > 0.1 and within.mean().item() > 0.25
    assert across.abs().max().item() < 0.05
    sigma = data.correlation_matrix()
    assert torch.allclose(sigma, sigma.T) and torch.linalg.eigvalsh(sigma).min() > 0
    # The uncorrelated generator shows no structure at all.
    plain = ToyData(ToyConfig(d=16, n_features=24, mean_active=6.0, decay=1.0, seed=1))
    corr = _firing_correlations(plain.sample(20_000).coefficients != 0)
    assert corr[off_diag].abs().max().item() < 0.05


def test_determinism_with_a_seed():
    cfg = ToyConfig(d=8, n_features=16, mean_active=2, correlated=True, n_groups=4, seed=7)
    a, b = ToyData(cfg), ToyData(cfg)
    assert torch.equal(a.features, b.features) and torch.equal(a.groups, b.groups)
    first = a.sample(64)
    assert torch.equal(first.x, b.sample(64).x)
    assert not torch.equal(first.x, a.sample(64).x)  # the stream advances
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(a.sample(32, g1).coefficients, b.sample(32, g2).coefficients)
    other = ToyData(ToyConfig(d=8, n_features=16, mean_active=2, seed=8))
    assert not torch.equal(a.features, other.features)


@pytest.mark.parametrize("field, value", [
    ("mean_active", 17.0), ("mean_active", 0.0), ("decay", 1.5), ("n_groups", 0),
    ("correlation", 1.0), ("magnitude", "gaussian"), ("d", 0),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ToyConfig(**{"d": 8, "n_features": 16, "mean_active": 2, field: value})


def test_constant_magnitude():
    data = ToyData(ToyConfig(d=8, n_features=16, mean_active=2, magnitude="constant"))
    coef = data.sample(100).coefficients
    assert set(coef.unique().tolist()) <= {0.0, 1.0}
