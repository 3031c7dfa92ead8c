"""Training configuration: one frozen dataclass, and a resolved object for derived values.

Defaults follow Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") for the top-k family
(Adam, auto LR 2e-4 / sqrt(F / 2^14), AuxK with k_aux = D/2 and coefficient 1/32, dead after 10 M
tokens or a tenth of the budget, whichever is smaller) and Anthropic's April 2024 update for the
penalty family (L1 weighted by decoder norms, coefficient warm-up over the first 5%, resampling of
dead features). For every architecture: LR warm-up over the first 5% then constant (Anthropic's
decay over the last 20% is lr_decay=0.2; it did worse here). TopK trains on inputs at unit scale
with no gradient clip, as dictionary-learning does, on sparsify's per-batch FVU loss, from
uncalibrated encoder rows of nn.Linear's Kaiming scale (1/sqrt(3)) tied in direction to the unit
decoder rows. BatchTopK and the penalty family keep inputs at sqrt(D) scale (in which the penalty
coefficients, bandwidth and threshold are quoted), a calibrated encoder, the gradient norm clipped
at 1 (massive-activation tokens make rare huge gradients) and the squared error: BatchTopK did
worse with TopK's settings (FVU 0.122 with its earlier ones, 0.084 with these, against 0.077-0.079
at k 50). BENCHMARKS.md [O1.3] has the runs on SmolLM2 layer 15 behind each choice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PENALTY_ACTIVATIONS = ("relu", "gated", "jumprelu")
RECON_LOSSES = ("mse", "fvu")
TOPK_ENCODER_NORM = 3 ** -0.5
"""TopK's initial encoder row norm: nn.Linear's Kaiming-uniform rows, U(-1/sqrt(D), 1/sqrt(D))."""


def _optional_bool(text: str) -> bool:
    """--calibrate_init alone means true; 'true'/'false' (or yes/no, 1/0) set it."""
    from simple_parsing.utils import str2bool

    return str2bool(text)


_OPTIONAL_FLAG = {"custom_args": {"nargs": "?", "const": True, "type": _optional_bool}}
"""Command-line form of a bool that may be left unset: a bare flag means true."""

def _needs_value(metavar: str) -> dict:
    """Command-line form of a number or name that may be left unset: the flag takes exactly one
    value (a bare `--grad-clip` is an error, not a silent 'unset')."""
    return {"custom_args": {"nargs": None, "metavar": metavar}}


@dataclass(frozen=True)
class TrainConfig:
    """How to train a coder: architecture, size, sparsity, budget, optimiser, dead features."""

    activation: str = "topk"
    """Architecture: topk, batchtopk, jumprelu, gated or relu."""
    kind: str = "sae"
    """sae (reconstruct the hookpoint), transcoder (predict --out-hookpoint from the hookpoint) or
    skip_transcoder (a transcoder with a linear skip path)."""
    n_features: int = 0
    """Number of features; 0 means expansion x the input width."""
    expansion: int = 16
    """Features per input dimension, used when n_features is 0."""
    k: int = 32
    """Active features per token (topk, batchtopk); ignored by the penalty architectures."""
    penalty: str = "auto"
    """Sparsity penalty for relu/gated/jumprelu: l1 (activations x decoder norms), lp (the same to
    the power p < 1), l0 (jumprelu's straight-through count) or auto (architecture default)."""
    coef: float = 0.0
    """Sparsity coefficient multiplying the penalty; required (> 0) for relu/gated/jumprelu.
    Typical on normalised inputs (E||x||^2 = D, squared error summed over D): l1 ~ 1-5; jumprelu's
    l0 ~ 1-10 (firing costs coef, so thresholds settle near sqrt(coef) in pre-activation units)."""
    coef_warmup: float = 0.05
    """Fraction of the steps over which the coefficient ramps linearly from 0."""
    p: float = 1.0
    """Exponent of the lp penalty (0 < p <= 1)."""
    p_end: float = 0.0
    """If > 0, anneal p linearly from p to p_end over training (Wright & Sharkey); 0 = constant."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: width of the straight-through kernel, in pre-activation units of the normalised
    inputs (CoderConfig.jumprelu_bandwidth)."""
    jumprelu_init_threshold: float = 0.5
    """JumpReLU: initial threshold of every feature, in the same units. Under Adam a threshold moves
    about lr per step, so it must start near its final scale (pre-activations of normalised inputs
    are O(1-10); thresholds settle near sqrt(coef)) or it cannot get there within the budget: at
    the automatic LR (2e-4 at 16k features) 1,000 steps move it by 0.2. 0.5 suits coef ~0.3-1 (the
    architecture benchmark's runs); the JumpReLU paper's 0.001 assumes far longer runs."""
    tokens: int = 1_000_000
    """Training budget in tokens."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    lr: float = 0.0
    """Learning rate; 0 = automatic, 2e-4 / sqrt(n_features / 2^14) (Gao et al. 2024)."""
    lr_warmup: float = 0.05
    """Fraction of steps of linear LR warm-up."""
    lr_decay: float = 0.0
    """Fraction of steps at the end over which the LR decays linearly to 0 (0 = constant after the
    warm-up, as dictionary-learning and sparsify train; on SmolLM2 layer 15, one epoch at the best
    LR, a decay over the last fifth of the steps gave FVU 0.097 against 0.085 without; BENCHMARKS.md)."""
    grad_clip: float | None = dataclasses.field(default=None, metadata=_needs_value("float"))
    """Clip each coder's gradient norm to this before the optimizer step (0 = off; unset = off for
    topk, 1 for the others). At sqrt(D) scale on SmolLM2 layer 15 a batch holding a
    massive-activation token has a gradient 100-1000x the others' and, unclipped, inflates Adam's
    second moments for the next ~1/(1 - beta2) steps (one epoch at the automatic LR: FVU 0.48
    unclipped, 0.42 clipped at 1). At TopK's unit scale and best LR the clip instead shrinks
    exactly the steps that teach the features of those tokens (their relative error 0.099
    clipped, 0.033 not; BENCHMARKS.md)."""
    recon_loss: str | None = dataclasses.field(default=None, metadata=_needs_value("str"))
    """The reconstruction loss: mse (squared error summed over dimensions, mean over tokens) or
    fvu (the same divided by the batch's total variance per token, sparsify's loss); unset = fvu
    for topk, mse for the others. Under Adam a constant factor changes nothing; a per-batch one
    weighs each batch by 1 / its variance, so a batch holding a massive-activation token moves the
    coder less. The whole loss (AuxK, the penalty) is divided by the same number, so the
    coefficients keep their meaning (a batch left with no variance at all is taken as mse). Local
    steps only: the spliced steps of e2e losses have no reconstruction term."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    init: str = "transpose"
    """Initialisation of the directions: transpose (decoder = encoder transpose), data (rows drawn
    from activations) or random."""
    bias_init: str = "geometric_median"
    """Initial decoder bias: geometric_median, mean or zero."""
    calibrate_init: bool | None = dataclasses.field(default=None, metadata=_OPTIONAL_FLAG)
    """Scale the initial encoder so the first reconstruction has the target's norm (coders/init.py);
    false gives every encoder row the norm init_encoder_norm instead. Unset = false for topk, true
    for the others."""
    init_encoder_norm: float | None = dataclasses.field(default=None, metadata=_needs_value("float"))
    """Norm of every initial encoder row when it is not calibrated (calibrate_init false; the
    decoder rows are unit norm either way); unset = 1/sqrt(3) for topk (nn.Linear's
    Kaiming-uniform scale, as sparsify starts), 1 otherwise (W_enc = W_dec of a tied SAE, as
    dictionary-learning starts)."""
    normalize: bool = True
    """Train on inputs scaled by one constant so that E||x||^2 = input_norm^2 (folded into the
    saved weights), the mean taken over the first batch's typical tokens (outliers, by
    outlier_multiple, left out of the estimate even when trained on)."""
    input_norm: float | None = dataclasses.field(default=None, metadata=_needs_value("float"))
    """With normalize: scale inputs so that sqrt(E||x||^2) = this; 0 = sqrt(D); unset = 1 for
    topk (dictionary-learning's scale), sqrt(D) for the others; relu/gated/jumprelu's
    coefficient, bandwidth and threshold defaults above are quoted for sqrt(D). Under Adam every
    parameter moves about lr per step, so this sets how fast the biases move relative to their
    size."""
    outlier_multiple: float = 10.0
    """Outlier tokens: norm above this multiple of the median norm of the first batch (0 = no
    rule). They are counted during training and reported at evaluation (the metrics table's FVU
    without outliers uses the same rule); with drop_outliers they are also left out of training."""
    drop_outliers: bool = False
    """Leave outlier tokens out of training and of the normalisation statistics. Off by default:
    on SmolLM2 layer 15 a few massive-activation tokens carry most of the variance, and a coder
    that never saw them reconstructs them badly (one epoch, lr 5.3e-4: FVU over all tokens 0.59
    when dropping them, 0.30 when training on them; BENCHMARKS.md)."""
    dead_tokens: int = 0
    """A feature is dead after this many tokens without firing; 0 = min(10 M, tokens / 10)."""
    auxk_coef: float = 1 / 32
    """AuxK loss coefficient (top-k family)."""
    k_aux: int = 0
    """Dead features AuxK may use per token; 0 = input width / 2."""
    resample_every: int = 0
    """Resample dead features every this many steps (0 = at 1/4, 1/2 and 3/4 of training when the
    architecture has a penalty, never for the top-k family, which has AuxK; -1 = never). Never
    in the last fifth of the steps nor once the LR decay has begun: a feature resampled then has no
    time (or no LR) left to settle, and at the end of a top-k run fresh features win the top k from
    trained ones (seen on toy data at 2N: FVU 0.05 -> 1.1 in the last 25 steps)."""
    sparse_path: bool = True
    """Train the top-k family through the sparse path (coders/sparse.py: one dense encoder GEMM,
    everything else on the active features only); False = the eager dense reference."""
    sparse_adam: bool = True
    """On the sparse path, take W_enc's and W_dec's Adam steps straight from the backward's sparse
    factors (train/sparse_adam.py): no [F, D] gradients are stored, the same Adam up to float
    rounding. Applies without gradient clipping or data-parallel gradient all-reduce. False = the
    gradients land in .grad (for hooks that read them)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a killed run resumes from the last one)."""
    log_every: int = 10
    """Steps between progress-bar / W&B updates."""
    wandb_project: str = ""
    """Log to this Weights & Biases project (needs the wandb extra); empty = off."""

    def __post_init__(self):
        if self.activation in PENALTY_ACTIVATIONS and not self.coef > 0:
            raise ValueError(f"coef={self.coef}: activation={self.activation!r} is trained with a "
                             "sparsity penalty whose coefficient must be > 0 (e.g. --coef 2 for "
                             "l1, --coef 3 for jumprelu's l0); or use --activation topk")
        for name in ("tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.tokens < self.batch_size:
            raise ValueError(f"tokens={self.tokens} is less than one batch ({self.batch_size})")
        for name in ("coef_warmup", "lr_warmup", "lr_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a fraction in [0, 1]")
        if self.lr < 0:
            raise ValueError(f"lr={self.lr} must be >= 0 (0 = automatic)")
        if self.input_norm is not None and self.input_norm < 0:
            raise ValueError(f"input_norm={self.input_norm} must be >= 0 (0 = sqrt(input width))")
        if self.init_encoder_norm is not None and not self.init_encoder_norm > 0:
            raise ValueError(f"init_encoder_norm={self.init_encoder_norm} must be > 0")
        if self.init_encoder_norm is not None and self.resolved_calibrate_init:
            why = (": drop it or set calibrate_init false" if self.calibrate_init else
                   f", but {self.activation}'s encoder is calibrated by default: also set calibrate_init false")
            raise ValueError(f"init_encoder_norm={self.init_encoder_norm} sets the scale of an "
                             f"encoder that is not calibrated{why}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0 (0 = no clipping)")
        if self.n_features < 0 or self.expansion < 1:
            raise ValueError("n_features must be >= 0 and expansion >= 1")
        if not 0 < self.p <= 1 or not 0 <= self.p_end <= 1:
            raise ValueError(f"p={self.p} and p_end={self.p_end} must lie in (0, 1]")
        if not (self.jumprelu_bandwidth > 0 and self.jumprelu_init_threshold > 0):
            raise ValueError(f"jumprelu_bandwidth={self.jumprelu_bandwidth} and jumprelu_init_threshold="
                             f"{self.jumprelu_init_threshold} must both be > 0")
        if self.recon_loss is not None and self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss={self.recon_loss!r} is unknown; pick one of "
                             f"{', '.join(RECON_LOSSES)}")
        if self.resolved_recon_loss == "fvu" and self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}: the fvu loss divides by the batch's "
                             "variance, which one row does not have; use a larger batch or "
                             "recon_loss mse")
        if self.outlier_multiple < 0:
            raise ValueError(f"outlier_multiple={self.outlier_multiple} must be >= 0 (0 = off)")

    @property
    def resolved_calibrate_init(self) -> bool:
        """calibrate_init, or the architecture's default when unset (false for topk only)."""
        return self.activation != "topk" if self.calibrate_init is None else self.calibrate_init

    @property
    def resolved_recon_loss(self) -> str:
        """recon_loss, or the architecture's default when unset (fvu for topk, mse otherwise)."""
        if self.recon_loss is not None:
            return self.recon_loss
        return "fvu" if self.activation == "topk" else "mse"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}")
        return cls(**d)

    def resolve(self, d_in: int) -> "Resolved":
        n_features = self.n_features or self.expansion * d_in
        steps = self.tokens // self.batch_size
        lr = self.lr or 2e-4 / math.sqrt(n_features / 2**14)
        dead = self.dead_tokens or min(10_000_000, max(self.tokens // 10, self.batch_size))
        # no resampling in the last 20% of steps nor once the LR decay has begun
        settled = steps - int(max(self.lr_decay, 0.2) * steps)
        if self.resample_every > 0:
            resample = tuple(range(self.resample_every, settled, self.resample_every))
        elif self.resample_every == 0 and self.activation in PENALTY_ACTIVATIONS:
            resample = tuple(sorted({steps // 4, steps // 2, 3 * steps // 4} - {0}))
        else:
            resample = ()
        topk = self.activation == "topk"  # BatchTopK did worse so (config docstring)
        calibrate = self.resolved_calibrate_init
        return Resolved(n_features=n_features, steps=steps, lr=lr, dead_tokens=dead,
                        k_aux=self.k_aux or max(1, d_in // 2), resample_steps=resample,
                        grad_clip=(0.0 if topk else 1.0) if self.grad_clip is None else self.grad_clip,
                        input_norm=(1.0 if topk else 0.0) if self.input_norm is None else self.input_norm,
                        calibrate_init=calibrate,
                        init_encoder_norm=((TOPK_ENCODER_NORM if topk and not calibrate else 1.0)
                                           if self.init_encoder_norm is None
                                           else self.init_encoder_norm),
                        recon_loss=self.resolved_recon_loss)


@dataclass(frozen=True)
class Resolved:
    """Values derived from a TrainConfig and the input width."""

    n_features: int
    steps: int
    lr: float
    dead_tokens: int
    k_aux: int
    resample_steps: tuple[int, ...]
    grad_clip: float
    input_norm: float
    """0 = sqrt(D)."""
    calibrate_init: bool
    init_encoder_norm: float
    recon_loss: str


def lr_factor(step: int, steps: int, warmup: float, decay: float) -> float:
    """Linear warm-up over the first `warmup` fraction, linear decay to 0 over the last `decay`."""
    w, d = int(warmup * steps), int(decay * steps)
    if w and step < w:
        return (step + 1) / w
    if d and step >= steps - d:
        return max(0.0, (steps - step) / d)
    return 1.0


def ramp(step: int, steps: int, frac: float) -> float:
    w = int(frac * steps)
    return 1.0 if w == 0 or step >= w else (step + 1) / w


def clip_gradients(coder: torch.nn.Module, max_norm: float) -> float | None:
    """Scale the coder's gradients down to norm max_norm when above it; their norm before, or None
    when max_norm is 0 (off: no pass over the gradients)."""
    if max_norm <= 0:
        return None
    from torch.nn.utils import clip_grad_norm_

    return float(clip_grad_norm_(coder.parameters(), max_norm))
