"""Every metric against a hand computation on small tensors; streaming equals one-shot."""

import math

import pytest
import torch

from monosemantic import metrics as M

# Three tokens, two dimensions; worked by hand below.
X = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
XH = torch.tensor([[1.0, 1.0], [2.0, 0.0], [2.0, 2.0]])
ACTS = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.5, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])


def test_mse_and_per_element():
    # squared errors per token: (0+1), (1+0), (0+4) -> mean 2; per element 6/6 = 1
    assert M.mse(XH, X).item() == pytest.approx(2.0)
    assert M.mse_per_element(XH, X).item() == pytest.approx(1.0)


def test_fvu_is_variance_about_the_mean_of_the_whole_set():
    # mean x = (2, 2); total SS = (1+0+1) + (0+4+4) = 10; residual SS = 6
    assert M.fvu(XH, X).item() == pytest.approx(0.6)
    assert M.explained_variance(XH, X).item() == pytest.approx(0.4)
    # Not the mean of per-batch ratios: batches {0, 1} and {1, 2} give 2/4 and 5/8.5, mean 0.544.
    assert M.fvu(XH[:2], X[:2]).item() == pytest.approx(0.5)
    assert M.fvu(XH[1:], X[1:]).item() == pytest.approx(5 / 8.5)


def test_cosine_l2_ratio_and_bias():
    cos = [3 / (math.sqrt(5) * math.sqrt(2)), 1.0, 12 / (math.sqrt(20) * math.sqrt(8))]
    assert M.cosine_similarity(XH, X).item() == pytest.approx(sum(cos) / 3)
    ratio = [math.sqrt(2) / math.sqrt(5), 2 / 3, math.sqrt(8) / math.sqrt(20)]
    assert M.l2_ratio(XH, X).item() == pytest.approx(sum(ratio) / 3)
    # sum ||x_hat||^2 = 2 + 4 + 8 = 14; sum x_hat . x = 3 + 6 + 12 = 21
    assert M.relative_reconstruction_bias(XH, X).item() == pytest.approx(14 / 21)
    # a pure shrink x_hat = c x gives bias c (< 1 means shrinkage)
    assert M.relative_reconstruction_bias(0.8 * X, X).item() == pytest.approx(0.8)


def test_zero_reconstruction_has_cosine_zero_not_nan():
    assert M.cosine_similarity(torch.zeros_like(X), X).item() == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="identical shapes"):
        M.mse(XH[:2], X)


def test_firing_metrics():
    assert M.l0(ACTS).item() == pytest.approx(4 / 3)
    density = M.feature_density(ACTS)
    assert density.tolist() == pytest.approx([1 / 3, 1.0, 0.0, 0.0])
    assert M.dead_fraction(density) == 0.5
    assert M.dense_fraction(density) == 0.5
    assert M.dense_fraction(density, threshold=0.5) == 0.25
    assert M.dead_fraction(density, threshold=0.4) == 0.75


def test_density_histogram_counts_dead_separately(tmp_path):
    density = torch.tensor([0.0, 0.0, 2e-3, 5e-3, 3e-2, 0.5])
    hist = M.density_histogram(density, bins=3, log10_range=(-3.0, 0.0))
    assert hist.n_dead == 2
    assert hist.counts.tolist() == [2, 1, 1]
    assert hist.log10_edges.tolist() == pytest.approx([-3, -2, -1, 0])
    pytest.importorskip("matplotlib")
    out = M.plot_density_histogram(density, tmp_path / "d.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_next_token_ce_and_kl_by_hand():
    # V=2, logits (0, log 3) -> p = (1/4, 3/4)
    lg = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, 5.0]]])
    tokens = torch.tensor([[0, 1, 0]])
    ce = M.next_token_ce(lg, tokens)  # position 0 predicts 1 (p 3/4), position 1 predicts 0 (1/2)
    assert ce.count == 2
    assert ce.total == pytest.approx(-math.log(0.75) - math.log(0.5))
    masked = M.next_token_ce(lg, tokens, torch.tensor([[False, True, True]]))
    assert masked.count == 1 and masked.mean == pytest.approx(math.log(2))
    # KL((1/4, 3/4) || (1/2, 1/2)) at position 0; identical elsewhere
    patched = lg.clone()
    patched[0, 0] = 0.0
    kl = M.kl_divergence(lg, patched)
    expect = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl.count == 3 and kl.total == pytest.approx(expect, abs=1e-6)
    only0 = M.kl_divergence(lg, patched, torch.tensor([[True, False, False]]))
    assert only0.mean == pytest.approx(expect, abs=1e-6)


def test_ce_and_kl_agree_with_torch_over_many_row_blocks():
    """The blockwise logsumexp forms give F.cross_entropy's and F.kl_div's values: more positions
    than one block (LOGIT_ROWS), a random mask, logits large enough to need the max shift."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 50, 97
    lg = 30 * torch.randn(B, T, V, generator=g)
    patched = lg + 3 * torch.randn(B, T, V, generator=g)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    assert B * T > M.LOGIT_ROWS
    keep = mask[:, :-1]
    ce = M.next_token_ce(lg, tok, mask)
    ref = F.cross_entropy(lg[:, :-1][keep].double(), tok[:, 1:][keep], reduction="sum")
    assert ce.count == int(keep.sum()) and ce.total == pytest.approx(float(ref), rel=1e-5)
    kl = M.kl_divergence(lg, patched, mask)
    ref = F.kl_div(F.log_softmax(patched[mask].double(), -1), F.log_softmax(lg[mask].double(), -1),
                   log_target=True, reduction="sum")
    assert kl.count == int(mask.sum()) and kl.total == pytest.approx(float(ref), rel=1e-4)
    assert M.kl_divergence(lg, lg).total == pytest.approx(0.0, abs=1e-3)


def test_sum_counts_add_exactly_over_batches():
    g = torch.Generator().manual_seed(0)
    lg, tok = torch.randn(5, 6, 7, generator=g), torch.randint(0, 7, (5, 6), generator=g)
    whole = M.next_token_ce(lg, tok)
    parts = M.next_token_ce(lg[:2], tok[:2]) + M.next_token_ce(lg[2:], tok[2:])
    assert parts.count == whole.count == 25
    assert parts.mean == pytest.approx(whole.mean, rel=1e-6)


def test_ce_loss_recovered():
    assert M.ce_loss_recovered(2.0, 2.5, 7.0) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="undefined"):
        M.ce_loss_recovered(2.0, 2.5, 2.0)


def _random_set(n=203, d=6, f=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.tensor([5.0, 1, 1, 0.5, 2, 1]) + 100.0
    x_hat = 0.9 * x + 0.3 * torch.randn(n, d, generator=g)
    acts = torch.relu(torch.randn(n, f, generator=g) - 1.0)
    acts[:, 3] = 0.0  # one dead feature
    outliers = torch.rand(n, generator=g) < 0.1
    return x_hat, x, acts, outliers


def test_stats_equal_hand_computation_and_are_batch_invariant():
    x_hat, x, acts, outliers = _random_set()
    one = M.ReconstructionStats()
    one.update(x_hat, x, acts, outliers)
    many = M.ReconstructionStats()
    for idx in torch.tensor_split(torch.arange(len(x)), [1, 5, 40, 41, 100, 170]):
        many.update(x_hat[idx], x[idx], acts[idx], outliers[idx])
    a, b = one.compute(), many.compute()
    for k, v in a.scalars().items():
        assert getattr(b, k) == pytest.approx(v, rel=1e-10, abs=1e-12), k
    assert torch.equal(a.density, b.density)

    xd, xhd = x.double(), x_hat.double()
    assert a.fvu == pytest.approx(M.fvu(xhd, xd).item(), rel=1e-9)
    assert a.mse == pytest.approx(M.mse(xhd, xd).item(), rel=1e-9)
    assert a.mse_per_element == pytest.approx(M.mse_per_element(xhd, xd).item(), rel=1e-9)
    assert a.cosine == pytest.approx(M.cosine_similarity(xhd, xd).item(), rel=1e-9)
    assert a.l2_ratio == pytest.approx(M.l2_ratio(xhd, xd).item(), rel=1e-9)
    assert a.relative_reconstruction_bias == pytest.approx(
        M.relative_reconstruction_bias(xhd, xd).item(), rel=1e-9)
    assert a.l0 == pytest.approx(M.l0(acts).item(), rel=1e-6)
    assert a.density.tolist() == pytest.approx(M.feature_density(acts).tolist())
    assert a.dead_fraction == pytest.approx(1 / 11)
    assert a.n_tokens == 203 and a.n_outliers == int(outliers.sum())
    keep = ~outliers
    assert a.fvu_excluding_outliers == pytest.approx(M.fvu(xhd[keep], xd[keep]).item(), rel=1e-9)


def test_top_variance_dims():
    x_hat, x, acts, outliers = _random_set()
    stats = M.ReconstructionStats()
    stats.update(x_hat, x, acts, outliers)
    top = stats.top_variance_dims(6)
    xd, xhd = x.double(), x_hat.double()
    var = ((xd - xd.mean(0)) ** 2).sum(0)
    sse = ((xd - xhd) ** 2).sum(0)
    assert [t.dim for t in top] == torch.argsort(var, descending=True).tolist()
    assert top[0].dim == 0  # the scale-5 dimension
    assert sum(t.variance_share for t in top) == pytest.approx(1.0)
    assert sum(t.error_share for t in top) == pytest.approx(1.0)
    for t in top:
        assert t.variance_share == pytest.approx((var[t.dim] / var.sum()).item(), rel=1e-9)
        assert t.fvu == pytest.approx((sse[t.dim] / var[t.dim]).item(), rel=1e-9)
    assert len(stats.top_variance_dims(2, exclude_outliers=True)) == 2


def test_stats_reject_inconsistent_batches():
    x_hat, x, acts, _ = _random_set()
    stats = M.ReconstructionStats()
    with pytest.raises(ValueError, match="call update"):
        stats.compute()
    stats.update(x_hat, x, acts)
    with pytest.raises(ValueError, match="F="):
        stats.update(x_hat, x, acts[:, :5])
    with pytest.raises(ValueError, match="same tokens"):
        stats.update(x_hat, x, acts[:7])
    with pytest.raises(ValueError, match="dead_threshold"):
        M.ReconstructionStats(dead_threshold=1.5)


def test_format_table():
    rows = [{"coder": "topk", "fvu": 0.123456, "l0": 32}, {"coder": "relu-wide", "fvu": 1.5}]
    assert M.format_table(rows).splitlines() == [
        "coder         fvu  l0",
        "---------  ------  --",
        "topk       0.1235  32",
        "relu-wide     1.5",
    ]
    assert M.format_table(rows, ["l0"]).splitlines()[2] == "32"
