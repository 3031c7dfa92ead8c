"""Canonical metric definitions for coders, each pinned by a unit test against a hand computation.

Every number a report prints is defined here once. Reconstruction metrics take `x_hat` and `x` of
shape [..., D] (leading dimensions are flattened into N tokens); feature metrics take `acts` of
shape [..., F]. Spliced-model metrics take logits [B, T, V] that the caller produced by running the
model clean, with the coder patched in, and with the hookpoint zero-ablated.

- MSE: `mse` is per-token squared error summed over D, averaged over tokens;
  `mse_per_element` averages over all N*D elements (it is `mse / D`).
- FVU (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): sum over tokens and
  dimensions of (x - x_hat)^2, divided by the same sum of (x - mean_over_tokens(x))^2, over the
  whole set (never an average of per-batch ratios). Explained variance is 1 - FVU.
- Shrinkage (Wright & Sharkey 2024, "Addressing feature suppression in SAEs"; Rajamanoharan et al.
  2024, "Improving dictionary learning with gated SAEs", eq. 10): the relative reconstruction bias
  is E||x_hat||^2 / E[x_hat . x], the SAEBench / dictionary_learning convention; below 1 means the
  coder shrinks its outputs. Its reciprocal is the gain gamma* that minimises
  E||gamma x_hat - x||^2.
- Spliced-model CE / KL are returned as a `SumCount` so batches add up exactly; CE loss recovered
  is (ce_zero - ce_patched) / (ce_zero - ce_clean), as in SAEBench's `ce_loss_score`.

`ReconstructionStats` streams all reconstruction and firing statistics over an eval set in float64
and gives the same numbers whether the set arrives in one batch or many.

Shapes: B batch, T tokens, D model width, F features, V vocabulary, N flattened tokens.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from monosemantic.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

_EPS = 1e-8


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _check_pair(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat has shape {tuple(x_hat.shape)} but x has shape {tuple(x.shape)}; "
                         "pass the reconstruction and its target with identical shapes [..., D]")


# ---------------------------------------------------------------- reconstruction (one batch)

def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-token squared error summed over D, averaged over tokens (0-dim tensor)."""
    _check_pair(x_hat, x)
    return (_flat(x_hat) - _flat(x)).pow(2).sum(-1).mean()


def mse_per_element(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over all N*D elements (0-dim tensor); equals `mse / D`."""
    _check_pair(x_hat, x)
    return (x_hat - x).pow(2).mean()


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean_over_tokens(x))^2, both
    sums over all tokens and dimensions. Infinite or NaN when x does not vary."""
    _check_pair(x_hat, x)
    x, x_hat = _flat(x), _flat(x_hat)
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def explained_variance(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 - `fvu`."""
    return 1 - fvu(x_hat, x)


def _token_cosine(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # A zero vector has cosine 0 with everything (rather than NaN).
    return (x_hat * x).sum(-1) / (x_hat.norm(dim=-1) * x.norm(dim=-1)).clamp_min(_EPS)


def _token_l2_ratio(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(_EPS)


def cosine_similarity(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine between each token's x_hat and x (0 where either is zero)."""
    _check_pair(x_hat, x)
    return _token_cosine(_flat(x_hat), _flat(x)).mean()


def relative_reconstruction_bias(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum ||x_hat||^2 / sum (x_hat . x) over the whole set (SAEBench / dictionary_learning
    convention, Gated-SAE paper eq. 10). Below 1 means shrinkage; 1 / this is the optimal gain
    gamma* = argmin E||gamma x_hat - x||^2. SAEBench averages per-batch ratios; this is the ratio of
    whole-set sums, which is what their per-batch value estimates."""
    _check_pair(x_hat, x)
    x, x_hat = _flat(x), _flat(x_hat)
    return x_hat.pow(2).sum() / (x_hat * x).sum()


def l2_ratio(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x_hat|| / ||x|| (||x|| clamped at 1e-8)."""
    _check_pair(x_hat, x)
    return _token_l2_ratio(_flat(x_hat), _flat(x)).mean()


# ---------------------------------------------------------------- feature firing

def l0(acts: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the number of nonzero features (0-dim float tensor)."""
    return (_flat(acts) != 0).sum(-1).float().mean()


def feature_density(acts: torch.Tensor) -> torch.Tensor:
    """[F] fraction of tokens on which each feature is nonzero."""
    return (_flat(acts) != 0).float().mean(0)


def dead_fraction(density: torch.Tensor, threshold: float = 0.0) -> float:
    """Fraction of features whose density is <= threshold (0: never fired)."""
    return (density <= threshold).float().mean().item()


def dense_fraction(density: torch.Tensor, threshold: float = 0.1) -> float:
    """Fraction of features whose density is > threshold (default: fire on over 10% of tokens)."""
    return (density > threshold).float().mean().item()


class DensityHistogram(NamedTuple):
    counts: torch.Tensor
    """[bins] number of live features per log10(density) bin."""
    log10_edges: torch.Tensor
    """[bins + 1] bin edges in log10(density)."""
    n_dead: int
    """Features with density 0, which have no logarithm and are counted here instead."""


def density_histogram(density: torch.Tensor, bins: int = 50,
                      log10_range: tuple[float, float] | None = None) -> DensityHistogram:
    """Histogram of log10(density) over live features; dead features are counted separately.
    The default range runs from the floor of the smallest live log10 density to 0."""
    if bins < 1:
        raise ValueError(f"bins={bins}; pass a positive number of bins")
    density = density.detach().double().cpu()
    live = density[density > 0]
    n_dead = int((density <= 0).sum())
    logd = live.log10()
    if log10_range is None:
        low = math.floor(logd.min().item()) if live.numel() else -1.0
        log10_range = (min(low, -1.0), 0.0)
    counts, edges = torch.histogram(logd.clamp(*log10_range), bins=bins,
                                    range=(float(log10_range[0]), float(log10_range[1])))
    return DensityHistogram(counts.long(), edges, n_dead)


def plot_density_histogram(density: torch.Tensor, path: str | os.PathLike,
                           title: str = "Feature density", bins: int = 50) -> Path:
    """Write a PNG histogram of log10(feature density) to `path`, dead features in the legend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_density_histogram needs matplotlib: "
                          "pip install 'monosemantic[plot]'") from e
    hist = density_histogram(density, bins)
    edges = hist.log10_edges.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(hist.counts.numpy(), edges, fill=True, alpha=0.8,
              label=f"live ({int(hist.counts.sum())})")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}  (dead: {hist.n_dead} of {density.numel()})")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------- spliced model (logits)

@dataclass(frozen=True)
class SumCount:
    """A sum and the number of terms in it; add two to pool batches exactly."""

    total: float
    count: int

    def __add__(self, other: SumCount) -> SumCount:
        return SumCount(self.total + other.total, self.count + other.count)

    @property
    def mean(self) -> float:
        """total / count (NaN when nothing was counted)."""
        return self.total / self.count if self.count else float("nan")


def _position_mask(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; pass a bool mask of shape "
                         f"{tuple(shape)} (one entry per position of the logits)")
    return mask.bool()


LOGIT_ROWS = 64
"""Positions whose [V] logits the CE and KL take at a time (64 x 49,152 floats = 12.6 MB for the
bundled model): no [B, T, V] log-softmax is ever made, only the counted positions are read, and
the temporaries stay small."""


def _counted_rows(shape: torch.Size, m: torch.Tensor | None, last: bool, device) -> torch.Tensor:
    """Flat indices b * T + t of the positions that count ([B, T] mask m; all when None), leaving
    out t = T - 1 unless `last`."""
    B, T = shape
    keep = torch.ones(B, T, dtype=torch.bool, device=device) if m is None else m.to(device).clone()
    if not last:
        keep[:, -1] = False
    return keep.reshape(-1).nonzero(as_tuple=True)[0]


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor,
                  mask: torch.Tensor | None = None) -> SumCount:
    """Next-token cross-entropy summed over counted positions.

    logits [B, T, V] at position t predict tokens[:, t + 1], so the last position has no target.
    mask [B, T] (bool) marks the positions whose prediction counts; mask[:, -1] is ignored. With
    padding, count a position only if it and the next are real tokens:
    `mask = attn[:, :-1] & attn[:, 1:]` padded with False at the end. In fp32, as
    logsumexp(logits) - logits[target] (= -log_softmax(logits)[target]) over LOGIT_ROWS positions
    at a time."""
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: pass "
                         "logits [B, T, V] and tokens [B, T]")
    m = _position_mask(mask, tokens.shape)
    rows = _counted_rows(tokens.shape, m, last=False, device=logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    targets = tokens.to(logits.device).long().roll(-1, dims=1).reshape(-1)  # tokens[:, t + 1]
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, len(rows), LOGIT_ROWS):
        r = rows[i:i + LOGIT_ROWS]
        x = flat.index_select(0, r).float()
        total += (torch.logsumexp(x, -1) - x.gather(1, targets[r, None]).squeeze(1)).double().sum()
    return SumCount(float(total), len(rows))


def kl_divergence(clean_logits: torch.Tensor, patched_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> SumCount:
    """KL(clean || patched) of the next-token distributions, summed over counted positions.
    mask [B, T] (bool) marks the positions that count. In fp32, over LOGIT_ROWS positions at a
    time, as sum_v p_v (c_v - q_v) - (logsumexp(c) - logsumexp(q)) for clean logits c, patched q
    and p = softmax(c): the same as sum_v p_v (log p_v - log softmax(q)_v)."""
    if clean_logits.shape != patched_logits.shape:
        raise ValueError(f"clean logits {tuple(clean_logits.shape)} and patched logits "
                         f"{tuple(patched_logits.shape)} differ; pass both as [B, T, V]")
    m = _position_mask(mask, clean_logits.shape[:-1])
    rows = _counted_rows(clean_logits.shape[:-1], m, last=True, device=clean_logits.device)
    fc = clean_logits.reshape(-1, clean_logits.shape[-1])
    fq = patched_logits.reshape(-1, patched_logits.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=clean_logits.device)
    for i in range(0, len(rows), LOGIT_ROWS):
        r = rows[i:i + LOGIT_ROWS]
        c, q = fc.index_select(0, r).float(), fq.index_select(0, r).float()  # copies: ours to overwrite
        lse_c, lse_q = torch.logsumexp(c, -1), torch.logsumexp(q, -1)
        p = torch.sub(c, lse_c[:, None]).exp_()
        total += (p.mul_(c.sub_(q)).sum(-1) - (lse_c - lse_q)).double().sum()
    return SumCount(float(total), len(rows))


def ce_loss_recovered(ce_clean: float, ce_patched: float, ce_zero: float) -> float:
    """(ce_zero - ce_patched) / (ce_zero - ce_clean): 1 when splicing in the coder costs nothing,
    0 when it is as bad as zero-ablating the hookpoint."""
    if ce_zero == ce_clean:
        raise ValueError(f"ce_zero == ce_clean == {ce_clean}: zero-ablating this hookpoint does "
                         "not change the loss, so the fraction recovered is undefined; report the "
                         "CE difference (ce_patched - ce_clean) instead")
    return (ce_zero - ce_patched) / (ce_zero - ce_clean)


# ---------------------------------------------------------------- tables

def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, float):
        return float_format.format(value)
    return "" if value is None else str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                 float_format: str = "{:.4g}") -> str:
    """A plain aligned text table: a header, a rule, one line per row. Numbers are right-aligned,
    everything else left-aligned; missing keys print empty. Columns default to the keys of all rows
    in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c), float_format) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
               for c in columns]

    def line(items: Sequence[str]) -> str:
        return "  ".join(s.rjust(w) if num else s.ljust(w)
                         for s, w, num in zip(items, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


# ---------------------------------------------------------------- streaming over an eval set

class _Moments:
    """Float64 running sums over a set of tokens. Sums of x are taken about a shift (the first
    batch's per-dimension mean) so that sum x^2 - (sum x)^2 / n stays well conditioned when a
    dimension's mean is large against its spread; variance does not depend on the shift."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None

    def add(self, x_hat: torch.Tensor, x: torch.Tensor, l0_tok: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(0)
            zeros = torch.zeros_like(self.shift)
            self.sum_dx, self.sum_dx2, self.sse = zeros.clone(), zeros.clone(), zeros.clone()
            self.hat_sq = self.dot = self.cos = self.l2r = self.l0 = zeros.new_zeros(())
        dx = x - self.shift
        self.sum_dx += dx.sum(0)
        self.sum_dx2 += dx.pow(2).sum(0)
        self.sse += (x - x_hat).pow(2).sum(0)
        self.hat_sq = self.hat_sq + x_hat.pow(2).sum()
        self.dot = self.dot + (x_hat * x).sum()
        self.cos = self.cos + _token_cosine(x_hat, x).sum()
        self.l2r = self.l2r + _token_l2_ratio(x_hat, x).sum()
        self.l0 = self.l0 + l0_tok.sum()
        self.n += x.shape[0]

    def variance(self) -> torch.Tensor:
        """[D] sum over tokens of (x_d - mean_d)^2."""
        return (self.sum_dx2 - self.sum_dx.pow(2) / self.n).clamp_min(0)

    def fvu(self) -> float:
        return (self.sse.sum() / self.variance().sum()).item() if self.n else float("nan")


@dataclass(frozen=True)
class ReconstructionMetrics:
    """Reconstruction and firing statistics over a whole eval set (see the module docstring)."""

    mse: float
    """Per-token squared error summed over D, averaged over tokens."""
    mse_per_element: float
    """Squared error averaged over all tokens and dimensions (mse / D)."""
    fvu: float
    """Fraction of variance unexplained, variance about the per-dimension mean of the whole set."""
    explained_variance: float
    """1 - fvu."""
    cosine: float
    """Mean over tokens of cos(x_hat, x)."""
    l0: float
    """Mean over tokens of the number of nonzero features."""
    dead_fraction: float
    """Fraction of features with density <= the dead threshold (default: never fired)."""
    dense_fraction: float
    """Fraction of features with density > the dense threshold (default 0.1)."""
    relative_reconstruction_bias: float
    """sum ||x_hat||^2 / sum x_hat . x; below 1 means shrinkage (SAEBench convention)."""
    l2_ratio: float
    """Mean over tokens of ||x_hat|| / ||x||."""
    n_tokens: int
    """Tokens seen, outliers included."""
    n_outliers: int
    """Tokens the caller flagged as outliers."""
    fvu_excluding_outliers: float
    """FVU over the unflagged tokens only (their own mean and variance); NaN if none are left."""
    density: torch.Tensor
    """[F] fraction of tokens on which each feature fired (float64, CPU)."""

    def scalars(self) -> dict[str, float | int]:
        """Every field but `density`, for tables and JSON."""
        return {k: v for k, v in self.__dict__.items() if k != "density"}


class DimensionShare(NamedTuple):
    dim: int
    """Index of the dimension."""
    variance_share: float
    """This dimension's share of the total variance (shares sum to 1 over D)."""
    fvu: float
    """This dimension's own FVU: its squared error over its own variance."""
    error_share: float
    """This dimension's share of the total squared error."""


class ReconstructionStats:
    """Streaming, exact reconstruction statistics: feed batches with `update`, read `compute`.

    Sums are float64, so one batch or many give the same numbers up to float64 rounding. Tokens
    flagged in `outlier_mask` count in every statistic and are also left out of a second set of
    sums that gives `fvu_excluding_outliers` and `top_variance_dims(exclude_outliers=True)`."""

    def __init__(self, dead_threshold: float = 0.0, dense_threshold: float = 0.1) -> None:
        if not 0 <= dead_threshold < 1:
            raise ValueError(f"dead_threshold={dead_threshold}; pass a density in [0, 1)")
        if not 0 <= dense_threshold < 1:
            raise ValueError(f"dense_threshold={dense_threshold}; pass a density in [0, 1)")
        self.dead_threshold, self.dense_threshold = dead_threshold, dense_threshold
        self._all, self._kept = _Moments(), _Moments()
        self._fires: torch.Tensor | None = None
        self.n_outliers = 0

    @torch.no_grad()
    def update(self, x_hat: torch.Tensor, x: torch.Tensor, acts: torch.Tensor,
               outlier_mask: torch.Tensor | None = None) -> None:
        """Add a batch: x_hat and x [..., D], acts [..., F], outlier_mask [...] (bool) or None."""
        _check_pair(x_hat, x)
        x64, xh64, a = _flat(x).double(), _flat(x_hat).double(), _flat(acts)
        if a.shape[0] != x64.shape[0]:
            raise ValueError(f"acts hold {a.shape[0]} tokens but x holds {x64.shape[0]}; pass the "
                             "feature activations of the same tokens, shape [..., F]")
        if self._all.shift is not None and x64.shape[1] != self._all.shift.shape[0]:
            raise ValueError(f"x has D={x64.shape[1]} but earlier batches had "
                             f"D={self._all.shift.shape[0]}; use one ReconstructionStats per coder")
        if self._fires is not None and a.shape[1] != self._fires.shape[0]:
            raise ValueError(f"acts have F={a.shape[1]} but earlier batches had "
                             f"F={self._fires.shape[0]}; use one ReconstructionStats per coder")
        fired = a != 0
        fires = fired.sum(0)
        self._fires = fires if self._fires is None else self._fires + fires
        l0_tok = fired.sum(-1).double()
        self._all.add(xh64, x64, l0_tok)
        if outlier_mask is None:
            self._kept.add(xh64, x64, l0_tok)
            return
        om = outlier_mask.reshape(-1).bool().to(x64.device)
        if om.shape[0] != x64.shape[0]:
            raise ValueError(f"outlier_mask holds {om.shape[0]} tokens but x holds "
                             f"{x64.shape[0]}; pass one bool per token, shape [...]")
        self.n_outliers += int(om.sum())
        keep = ~om
        self._kept.add(xh64[keep], x64[keep], l0_tok[keep])

    def compute(self) -> ReconstructionMetrics:
        """The statistics of everything fed so far."""
        s = self._all
        if s.n == 0 or self._fires is None:
            raise ValueError("no tokens seen; call update() with at least one batch first")
        density = (self._fires.double() / s.n).cpu()
        mse_ = (s.sse.sum() / s.n).item()
        fvu_ = s.fvu()
        return ReconstructionMetrics(
            mse=mse_, mse_per_element=mse_ / s.sse.shape[0], fvu=fvu_,
            explained_variance=1 - fvu_, cosine=(s.cos / s.n).item(), l0=(s.l0 / s.n).item(),
            dead_fraction=dead_fraction(density, self.dead_threshold),
            dense_fraction=dense_fraction(density, self.dense_threshold),
            relative_reconstruction_bias=(s.hat_sq / s.dot).item(),
            l2_ratio=(s.l2r / s.n).item(), n_tokens=s.n, n_outliers=self.n_outliers,
            fvu_excluding_outliers=self._kept.fvu(), density=density)

    def top_variance_dims(self, n: int = 10,
                          exclude_outliers: bool = False) -> list[DimensionShare]:
        """The n dimensions carrying the most variance, largest first, each with its share of the
        total variance, its own FVU and its share of the total squared error."""
        s = self._kept if exclude_outliers else self._all
        if s.n == 0:
            raise ValueError("no tokens in this set; call update() first (or keep some tokens "
                             "unflagged when exclude_outliers=True)")
        var, sse = s.variance().cpu(), s.sse.cpu()
        share, err_share = var / var.sum(), sse / sse.sum().clamp_min(1e-300)
        own_fvu = sse / var
        order = torch.argsort(var, descending=True)[:n].tolist()
        return [DimensionShare(d, share[d].item(), own_fvu[d].item(), err_share[d].item())
                for d in order]


__all__ = [
    "mse", "mse_per_element", "fvu", "explained_variance", "cosine_similarity",
    "relative_reconstruction_bias", "l2_ratio", "l0", "feature_density", "dead_fraction",
    "dense_fraction", "DensityHistogram", "density_histogram", "plot_density_histogram",
    "SumCount", "next_token_ce", "kl_divergence", "ce_loss_recovered", "format_table",
    "ReconstructionStats", "ReconstructionMetrics", "DimensionShare",
]
