"""SparseCoder: the base class of every sparse coder (SAE, transcoder, skip transcoder).

Shapes: B batch, D_in input width, D_out output width, F features, K active features.

A coder computes
    pre_acts = (x - b_dec) @ W_enc.T + b_enc        (SAE; a transcoder encodes x itself)
    acts     = activation(pre_acts)                   (one subclass per architecture, >= 0)
    out      = acts @ W_dec + b_dec  [+ x @ W_skip.T for a skip transcoder]
Subclasses override `_activate` (or `encode` when the architecture has its own encoder, as gated
does), `_penalised` (the non-negative quantity the l1/lp penalties sum), and `_rescale_features`
when they hold parameters in pre-activation units (thresholds).

Training conventions (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; Anthropic's
"Circuits updates, April 2024"): decoder rows are kept at unit norm during training
(`set_decoder_to_unit_norm` + `remove_gradient_parallel_to_decoder`), or the l1 penalty weights
each activation by its decoder row norm; dead features are revived by `auxk_loss`. Training runs on
inputs scaled by a constant; `fold_scale` folds that constant into the weights afterwards so the
saved coder maps raw activations to raw activations.
"""

from __future__ import annotations

import logging
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monosemantic.coders import kernels
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.sparse import (ActiveSet, Selection, TopKSelection, gather_rows, sparse_decode,
                                        sparse_encode, squared_error)

logger = logging.getLogger(__name__)

LP_EPS = 1e-4
"""The lp penalty is sum_i ((a_i + LP_EPS)^p - LP_EPS^p): zero at a_i = 0 like a_i^p, but its
gradient p (a_i + eps)^(p-1) stays bounded by p eps^(p-1) as a_i -> 0+ (a_i^p's is unbounded)."""


class EncoderOutput(NamedTuple):
    acts: Tensor
    """[B, F] dense feature activations after the nonlinearity (>= 0)."""
    pre_acts: Tensor
    """[B, F] encoder pre-activations (for gated: the gate's pre-activation)."""


class ForwardOutput(NamedTuple):
    out: Tensor
    """[B, D_out] reconstruction (SAE) or prediction (transcoder)."""
    acts: Tensor
    """[B, F] feature activations."""
    pre_acts: Tensor
    """[B, F] pre-activations, as in EncoderOutput."""
    sparsity_loss: Tensor
    """Scalar: the architecture's sparsity penalty, not multiplied by any coefficient (0 for top-k)."""
    aux_loss: Tensor
    """Scalar: architecture-specific auxiliary loss (gated's); 0 otherwise. Not AuxK."""


class SparseForwardOutput(NamedTuple):
    out: Tensor
    """[B, D_out] reconstruction or prediction, as ForwardOutput.out."""
    active: ActiveSet
    """The non-zero feature activations as a CSR matrix [B, F]."""


class SparseCoder(nn.Module):
    """Base class; build a concrete coder with `build_coder(cfg)` or `SparseCoder.load(folder)`."""

    activation_name: ClassVar[str] = ""
    """Set by `@register(name)`."""
    uses_k: ClassVar[bool] = False
    """Whether the architecture needs `cfg.k`."""
    penalties: ClassVar[tuple[str, ...]] = ("none",)
    """The `cfg.penalty` values the architecture accepts."""
    default_penalty: ClassVar[str] = "none"
    """What `penalty="auto"` means for this architecture."""
    unit_norm_decoder: ClassVar[bool] = False
    """Whether training must keep decoder rows at unit norm even under the l1/lp penalties (which
    otherwise weight activations by decoder norms and leave the decoder free)."""

    def __init__(self, cfg: CoderConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if cfg.activation != self.activation_name:
            raise ValueError(f"cfg.activation={cfg.activation!r} but this class is "
                             f"{type(self).__name__} ({self.activation_name!r}); use build_coder(cfg)")
        self.cfg = cfg
        self.weight_sink = None
        """Set by the trainer around a forward (train/sparse_adam.SparseAdamStep): the sparse path
        then hands W_enc's and W_dec's gradient factors to it instead of making .grad."""
        kw = {"device": device, "dtype": dtype}
        f, d_in, d_out = cfg.n_features, cfg.d_in, cfg.d_output
        self.W_enc = nn.Parameter(torch.empty(f, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(f, **kw))
        self.W_dec = nn.Parameter(torch.empty(f, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.W_skip = (nn.Parameter(torch.zeros(d_out, d_in, **kw))
                       if cfg.kind == "skip_transcoder" else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Data-free init: W_enc Kaiming-uniform (as nn.Linear); SAE: W_dec = W_enc with unit rows
        (tied at init, Gao et al. 2024); transcoders: random unit W_dec rows, since input and output
        directions are unrelated. `coders.init.initialize` does better with a data sample."""
        nn.init.kaiming_uniform_(self.W_enc, a=5 ** 0.5)
        if self.cfg.kind == "sae":
            self.W_dec.copy_(self.W_enc)
        else:
            nn.init.normal_(self.W_dec)
        self.set_decoder_to_unit_norm()

    @torch.no_grad()
    def _set_encoder(self, W_enc: Tensor, b_enc: Tensor) -> None:
        """Set the encoder's affine map (used by coders.init; gated also resets its magnitude path)."""
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(b_enc)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ---- forward ----------------------------------------------------------------------------

    def _pre_acts(self, x: Tensor) -> Tensor:
        """[B, D_in] -> [B, F]: the encoder's affine map (an SAE centres x on b_dec first)."""
        if self.cfg.kind == "sae":
            x = x - self.b_dec
        return F.linear(x, self.W_enc, self.b_enc)

    def _activate(self, pre_acts: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> EncoderOutput:
        """x [B, D_in] -> EncoderOutput(acts [B, F], pre_acts [B, F])."""
        pre = self._pre_acts(x)
        return EncoderOutput(self._activate(pre), pre)

    def decode(self, acts: Tensor) -> Tensor:
        """acts [B, F] -> [B, D_out] = acts @ W_dec + b_dec (the skip path is added in forward)."""
        return acts @ self.W_dec + self.b_dec

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip path x @ W_skip.T [B, D_out], or None when the coder has none."""
        return None if self.W_skip is None else x @ self.W_skip.T

    def forward(self, x: Tensor, target: Tensor | None = None) -> ForwardOutput:
        """x [B, D_in] -> ForwardOutput. `target` [B, D_out] is only read by architectures whose
        aux loss needs it (gated transcoders); an SAE's target is x."""
        enc = self.encode(x)
        out = self.decode(enc.acts)
        skip = self.skip(x)
        if skip is not None:
            out = out + skip
        return ForwardOutput(out, enc.acts, enc.pre_acts,
                             self.sparsity_penalty(enc.acts, enc.pre_acts),
                             self.aux_loss(x, enc, target))

    # ---- the sparse path (coders/sparse.py) ---------------------------------------------------

    def selection(self) -> Selection | None:
        """How this coder picks its active features in the current mode, for the sparse path; None
        when the architecture (or mode) needs the dense eager forward (penalties, straight-through
        estimators)."""
        return None

    @property
    def has_sparse_path(self) -> bool:
        return self.selection() is not None

    def encode_sparse(self, x: Tensor, scale: float = 1.0) -> ActiveSet:
        """x [B, D_in] -> the active features of scale * x as CSR, computing only the selected
        pre-activations' gradients. Same activations as `encode(scale * x)` (up to float rounding);
        in training (a weight sink) the scale rides on the encoder GEMM, with no scaled copy of x."""
        select = self.selection()
        if select is None:
            raise ValueError(f"{type(self).__name__} in {'training' if self.training else 'eval'} "
                             "mode has no sparse path; use forward()")
        centre = self.b_dec if self.cfg.kind == "sae" else None
        active = sparse_encode(x, self.W_enc, self.b_enc, select, centre, sink=self.weight_sink, scale=scale)
        self._after_sparse_encode(active)
        return active

    def _after_sparse_encode(self, active: ActiveSet) -> None:
        """Hook for state updated from the selection (BatchTopK's threshold)."""

    def forward_sparse(self, x: Tensor, scale: float = 1.0) -> SparseForwardOutput:
        """x [B, D_in] -> SparseForwardOutput: forward(scale * x) through the sparse path; the
        top-k family has no sparsity or aux loss, so only the output and the active set are
        returned."""
        if scale != 1.0 and (self.weight_sink is None or self.W_skip is not None):
            x, scale = x * scale, 1.0  # the scale rides on the encoder GEMM only in training
        active = self.encode_sparse(x, scale)
        out = sparse_decode(active, self.W_dec, sink=self.weight_sink, bias=self.b_dec)
        skip = self.skip(x)
        return SparseForwardOutput(out if skip is None else out + skip, active)

    def aux_loss(self, x: Tensor, enc: EncoderOutput, target: Tensor | None) -> Tensor:
        """Architecture-specific auxiliary loss; 0 unless overridden."""
        return enc.pre_acts.new_zeros(())

    # ---- sparsity ---------------------------------------------------------------------------

    def _penalised(self, acts: Tensor, pre_acts: Tensor) -> Tensor:
        """[B, F] non-negative magnitudes the l1/lp penalties sum (before decoder-norm weighting)."""
        return acts

    def sparsity_penalty(self, acts: Tensor, pre_acts: Tensor, p: float | None = None) -> Tensor:
        """Scalar: mean over the batch of the sum over features of the configured penalty.
        l1: a_i ||W_dec_i||; lp: ((a_i ||W_dec_i|| + eps)^p - eps^p) with eps = LP_EPS.
        `p` overrides cfg.p (the trainer anneals it)."""
        kind = self.cfg.resolved_penalty
        if kind == "none":
            return pre_acts.new_zeros(())
        if kind == "l0":
            return self._l0_penalty(acts, pre_acts)
        mag = self._penalised(acts, pre_acts) * self.W_dec.norm(dim=1)
        if kind == "l1":
            return mag.sum(-1).mean()
        p = self.cfg.p if p is None else p
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p={p} is out of range; the lp penalty needs 0 < p <= 1")
        return ((mag + LP_EPS) ** p - LP_EPS ** p).sum(-1).mean()

    def _l0_penalty(self, acts: Tensor, pre_acts: Tensor) -> Tensor:
        raise ValueError(f"penalty='l0' is not available for {self.activation_name!r}")

    # ---- dead features: AuxK ----------------------------------------------------------------

    def auxk_loss(self, x: Tensor, target: Tensor, pre_acts: Tensor | None, dead_mask: Tensor,
                  k_aux: int, out: Tensor | None = None, normalize: bool = True,
                  scale: float = 1.0, target_scale: float = 1.0) -> Tensor:
        """AuxK (Gao et al. 2024): the top-k_aux pre-activations among dead features (ReLU'd) must
        reconstruct the main residual (target - out), decoded without b_dec. Returns the MSE
        divided by the residual's variance (0 when no feature is dead); with normalize=False the
        MSE itself (what a trainer that weighs the term by the residual's variance wants: the
        residual is detached, so the two differ by a constant). The residual is detached, so only
        dead features' pre-activations and decoder rows get gradient. `out` is the main output for
        x; pass it to save a second forward (recomputed without grad when None). `pre_acts` [B, F]
        are the main forward's; None computes the dead features' pre-activations alone through
        the sparse path (cost proportional to the number of dead features), with the centre
        folded into their bias (no centred copy of x) and no [B, D] error.

        `scale` and `target_scale`: the coder's input is scale * x and its target
        target_scale * target (a trainer's normalisation, left to the GEMM and the loss rather
        than copied); `out` is the output for the scaled input. With normalize=False on that
        path the residual is never made either: ||recon - (t - out)||^2 = ||(recon + out) - t||^2,
        so the dead features' decode is added to (a copy of) out in place."""
        n_dead = int(dead_mask.sum())
        if n_dead == 0 or k_aux < 1:
            return x.new_zeros(())
        if out is None:
            with torch.no_grad():
                saved = [b.clone() for b in self.buffers()]  # don't count x twice (batchtopk)
                out = self.forward(x * scale if scale != 1.0 else x).out
                for b, s in zip(self.buffers(), saved):
                    b.copy_(s)
        dead_mask = dead_mask.to(x.device)
        if pre_acts is None:
            dead = dead_mask.nonzero(as_tuple=True)[0]
            sink = self.weight_sink
            W_dead = gather_rows(self.W_enc, dead, sink, "W_enc")
            b_dead = self.b_enc[dead]
            if self.cfg.kind == "sae":  # (s x - b_dec) W^T + b = s x W^T + (b - W b_dec)
                b_dead = b_dead - W_dead @ self.b_dec
            active = sparse_encode(x, W_dead, b_dead, TopKSelection(min(k_aux, n_dead)),
                                   scale=scale, gemm_scale=True)
            recon = sparse_decode(active, gather_rows(self.W_dec, dead, sink, "W_dec"))
            if not normalize:  # recon + out against the target: the only [B, D] is recon
                return squared_error(recon.add_(out.detach()), target.detach(), overwrite=True,
                                     scale=target_scale) / max(1, x.shape[0])
            residual = torch.sub(out.detach(), target.detach(), alpha=target_scale).neg_()
            mse = squared_error(recon, residual, overwrite=True) / max(1, x.shape[0])
        else:
            residual = torch.sub(out.detach(), target.detach(), alpha=target_scale).neg_()
            masked = pre_acts.masked_fill(~dead_mask, float("-inf"))
            vals, idx = masked.topk(min(k_aux, n_dead), dim=-1, sorted=False)
            acts = torch.zeros_like(pre_acts).scatter(-1, idx, F.relu(vals))
            recon = acts @ self.W_dec
            mse = (recon - residual).pow(2).sum(-1).mean()
        if not normalize:
            return mse
        var = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        return mse / var.clamp_min(torch.finfo(var.dtype).tiny)

    # ---- re-initialising features (dead-feature resampling) ----------------------------------

    @torch.no_grad()
    def reset_features(self, idx: Tensor, enc_rows: Tensor, dec_rows: Tensor,
                       source: Tensor | None = None) -> None:
        """Give features `idx` [n] new encoder rows [n, D_in] and decoder rows [n, D_out], a zero
        encoder bias, and the architecture's fresh per-feature state (`_reset_feature_state`).
        `source` [n, D_in], when given, holds the input each new feature was drawn for: the
        architecture may use the new feature's pre-activation on it (a JumpReLU threshold must sit
        below it, or the feature can never fire and never learn)."""
        self.W_enc[idx] = enc_rows
        self.b_enc[idx] = 0.0
        self.W_dec[idx] = dec_rows
        own = None
        if source is not None:
            own = self._pre_acts(source).gather(1, idx[:, None].to(source.device))[:, 0]
        self._reset_feature_state(idx, own)

    def _reset_feature_state(self, idx: Tensor, source_pre_acts: Tensor | None) -> None:
        """Hook: per-feature parameters beyond W_enc, b_enc, W_dec (thresholds, gates).
        `source_pre_acts` [n]: each new feature's pre-activation on the input it was drawn for."""

    def per_feature_parameters(self) -> list[nn.Parameter]:
        """Parameters whose first dimension is the feature (their rows belong to one feature each)."""
        f = self.cfg.n_features
        return [p for name, p in self.named_parameters()
                if p.ndim >= 1 and p.shape[0] == f and name != "W_skip"]

    # ---- decoder norm -----------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_to_unit_norm(self) -> None:
        """Divide every W_dec row by its norm (rows of zero norm are left at zero)."""
        if kernels.unit_rows(self.W_dec):  # one pass, compiled
            return
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out of W_dec.grad the component along each feature's decoder row, so a step
        on unit-norm rows only rotates them (Bricken et al. 2023)."""
        W, G = self.W_dec, self.W_dec.grad
        if G is None or kernels.project_rows(W, G):  # one pass, compiled
            return
        # G -= (G . w / |w|^2) w, row by row, in blocks of rows: no [F, D] temporary, and each
        # block of G and W is still in cache for the update
        sq = W.norm(dim=1).square_().clamp_min_(torch.finfo(self.dtype).tiny)
        for i in range(0, W.shape[0], 1024):
            w, g = W[i:i + 1024], G[i:i + 1024]
            g.addcmul_(w, torch.linalg.vecdot(g, w).div_(sq[i:i + 1024])[:, None], value=-1.0)

    # ---- folding constants into the weights -------------------------------------------------

    @torch.no_grad()
    def _rescale_encoder(self, c: Tensor) -> None:
        """Multiply every feature's encoder pre-activation map by c [F] (> 0)."""
        self.W_enc.mul_(c[:, None])
        self.b_enc.mul_(c)

    @torch.no_grad()
    def _rescale_features(self, c: Tensor) -> None:
        """Multiply feature i's pre-activations and activations by c_i > 0, keeping which features
        fire unchanged (subclasses also scale thresholds)."""
        self._rescale_encoder(c)

    def _require_uniform(self, c: Tensor, why: str) -> None:
        if c.numel() and (c.max() / c.min() - 1).abs() > 1e-3:
            raise ValueError(f"{type(self).__name__} cannot absorb per-feature scales "
                             f"(ratio {float(c.max() / c.min()):.4g}): {why}. Keep decoder rows at "
                             "unit norm during training (set_decoder_to_unit_norm after each step)")

    @torch.no_grad()
    def fold_scale(self, in_scale: float, out_scale: float) -> None:
        """Fold the training normalisation x' = x * in_scale, y' = y * out_scale into the weights,
        so that afterwards forward(x) == (old forward)(x * in_scale) / out_scale. Decoder rows keep
        their norm: features are rescaled by 1/out_scale in the encoder (and thresholds)."""
        s, t = float(in_scale), float(out_scale)
        if not (s > 0 and t > 0):
            raise ValueError(f"in_scale={s} and out_scale={t} must both be > 0")
        if self.cfg.kind == "sae" and abs(s - t) > 1e-6 * max(s, t):
            raise ValueError(f"an SAE's input is its target, so in_scale={s} must equal out_scale={t}")
        self.W_enc.mul_(s)  # now pre(x) = old pre(x * s)  (SAE: with b_dec / s centring below)
        self.b_dec.div_(t)
        if self.W_skip is not None:
            self.W_skip.mul_(s / t)
        self._rescale_features(torch.full_like(self.b_enc, 1.0 / t))
        self._after_fold_scale(t)

    def _after_fold_scale(self, out_scale: float) -> None:
        """Hook for config fields in pre-activation units."""

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make every W_dec row unit norm, scaling the feature up by the old norm in the encoder
        so outputs are unchanged (rows of zero norm are left alone)."""
        norm = self.W_dec.norm(dim=1)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        self._rescale_features(norm)
        self.W_dec.div_(norm[:, None])

    # ---- files ------------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """Write folder/cfg.json and folder/coder.safetensors, atomically."""
        from monosemantic.coders.io import save_coder

        save_coder(self, folder)

    @classmethod
    def load(cls, folder: str, device: torch.device | str | None = None) -> "SparseCoder":
        """Load a coder saved by `save`; the class comes from the registry by cfg.activation."""
        from monosemantic.coders.io import load_coder

        coder = load_coder(folder, device=device)
        if cls is not SparseCoder and not isinstance(coder, cls):
            raise ValueError(f"{folder} holds a {type(coder).__name__}, not a {cls.__name__}; "
                             "load it with SparseCoder.load or load_coder")
        return coder
