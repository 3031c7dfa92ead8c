"""Initialising a coder from a sample of its training data.

`initialize(coder, sample, target, method, bias)`:
1. b_dec = a centre of the target (geometric median by Weiszfeld's algorithm, the mean, or zero):
   the geometric median resists outliers such as the attention-sink token's huge activations
   (Bricken et al. 2023 initialise b_dec at the geometric median).
2. Directions, each row unit norm:
   "transpose": W_enc Kaiming-uniform; an SAE ties W_dec = W_enc (Gao et al. 2024), a transcoder
       gets independent random unit W_dec rows. sparsify starts transcoder decoders at zero; we do
       not, because zero rows have no direction (unit-norm renormalisation is undefined) and random
       unit rows give both encoder and decoder gradient from the first step.
   "data": F rows drawn from the sample; W_enc rows = normalised (x - centre_in), W_dec rows =
       normalised (target - b_dec) of the same rows (for an SAE the two are equal), so every
       feature starts on a real datum. Drawn with replacement plus 1% noise when the sample has
       fewer than F rows.
   "random": W_enc Kaiming-uniform and independent random unit W_dec rows for every kind.
3. Encoder bias: an SAE's encoder already sees x - b_dec, so b_enc = 0; a transcoder's encoder gets
   b_enc = -W_enc @ centre_in (the same statistic of the input), so it too sees centred input.
4. Scale: W_enc and b_enc (and gated's b_mag) are multiplied by one constant, chosen (by bisection,
   since thresholds make the map not homogeneous) so that the mean norm of the initial
   reconstruction minus b_dec equals that of target - b_dec. We match norms rather than fit the
   least-squares scale because for an untied random decoder the least-squares scale is ~0.
   With calibrate=False every encoder row gets norm `encoder_norm` instead: 1 makes an SAE's W_enc
   equal W_dec exactly, as dictionary-learning initialises its TopK SAE; 1/sqrt(3) is nn.Linear's
   Kaiming-uniform scale, with which sparsify starts.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from monosemantic.coders.base import SparseCoder

logger = logging.getLogger(__name__)

METHODS = ("transpose", "data", "random")
BIASES = ("geometric_median", "mean", "zero")


def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """[N, D] -> [D]: the point minimising the sum of Euclidean distances to the rows of x
    (Weiszfeld's algorithm from the mean; stops when a step moves less than tol times the mean
    distance to the points)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    pts = x.detach().double()
    sq = pts.pow(2).sum(1)
    y = pts.mean(0)
    for _ in range(max_iter):
        # |p - y|^2 = |p|^2 - 2 p.y + |y|^2 and the weighted sum as a product: no [N, D] temporary
        # per iteration (float64 keeps the expansion accurate)
        dist = (sq - 2 * (pts @ y) + y @ y).clamp_min(0).sqrt()
        w = 1.0 / dist.clamp_min(1e-12)
        y_new = (w @ pts) / w.sum()
        step = (y_new - y).norm()
        y = y_new
        if step <= tol * dist.mean().clamp_min(1e-12):
            break
    return y.to(x.dtype)


def _centre(x: Tensor, bias: str) -> Tensor:
    if bias == "geometric_median":
        return geometric_median(x)
    if bias == "mean":
        return x.mean(0)
    return torch.zeros_like(x[0])


def _unit_rows(w: Tensor, inplace: bool = False) -> Tensor:
    norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return w.div_(norm) if inplace else w / norm


def _kaiming(f: int, d: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(d)  # nn.Linear's default: kaiming_uniform_(a=sqrt(5))
    return torch.rand(f, d, generator=gen).mul_(2).sub_(1).mul_(bound)  # in place: no [F, D] temporaries


CALIBRATION_ROWS = 1024
"""Rows of the initialisation sample the encoder-scale bisection evaluates (each of its ~30
steps is a forward pass; on the whole first batch they cost more than a hundred training steps)."""


@torch.no_grad()
def _calibrate_scale(coder: SparseCoder, x: Tensor, target: Tensor, iters: int = 30) -> None:
    """Scale the encoder by one constant s so the mean reconstruction norm (minus b_dec) matches
    the target's. The norm is non-decreasing in s (a larger s only lets more features through
    thresholds and makes active ones larger), so s is found by bisection in log space; a fixed-
    point update overshoots when thresholds hold back most features at s = 1. Evaluated on the
    first CALIBRATION_ROWS rows, through the sparse path where the coder has one; 30 halvings of
    the log-range [1e-6, 1e6] fix s to a relative 3e-8."""
    x, target = x[:CALIBRATION_ROWS], target[:CALIBRATION_ROWS]
    want = float((target - coder.b_dec).norm(dim=1).mean())
    buffers = {k: v.clone() for k, v in coder.named_buffers()}
    was_training = coder.training
    coder.train()  # batch-dependent architectures select as in training
    current = 1.0
    skip = coder.skip(x)

    def norm_at(s: float) -> float:
        nonlocal current
        coder._rescale_encoder(torch.full_like(coder.b_enc, s / current))
        current = s
        if coder.has_sparse_path:
            recon = coder.forward_sparse(x).out - (0 if skip is None else skip)
        else:
            recon = coder.decode(coder.encode(x).acts)
        got = float((recon - coder.b_dec).norm(dim=1).mean())
        for k, v in coder.named_buffers():
            v.copy_(buffers[k])
        return got if math.isfinite(got) else math.inf

    try:
        lo, hi = math.log(1e-6), math.log(1e6)
        if norm_at(math.exp(hi)) <= 0:
            logger.warning("initial reconstruction is zero at any scale; the encoder is left as is")
            norm_at(1.0)
            return
        for _ in range(iters):
            mid = (lo + hi) / 2
            if norm_at(math.exp(mid)) < want:
                lo = mid
            else:
                hi = mid
        norm_at(math.exp((lo + hi) / 2))
    finally:
        for k, v in coder.named_buffers():
            v.copy_(buffers[k])
        coder.train(was_training)


@torch.no_grad()
def initialize(coder: SparseCoder, sample: Tensor, target: Tensor | None = None,
               method: str = "transpose", bias: str = "geometric_median", seed: int = 0,
               calibrate: bool = True, encoder_norm: float = 1.0) -> None:
    """Initialise `coder` in place from sample [N, D_in] (and target [N, D_out] for transcoders;
    an SAE's target is its sample). See the module docstring for the steps."""
    cfg = coder.cfg
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; pick one of {', '.join(METHODS)}")
    if bias not in BIASES:
        raise ValueError(f"bias={bias!r} is unknown; pick one of {', '.join(BIASES)}")
    if target is None:
        if cfg.kind != "sae":
            raise ValueError(f"a {cfg.kind} predicts another activation: pass target= "
                             "(the output hookpoint's activations for the same tokens)")
        target = sample
    if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
        raise ValueError(f"sample has shape {tuple(sample.shape)}; expected [N, d_in={cfg.d_in}]")
    if target.shape != (sample.shape[0], cfg.d_output):
        raise ValueError(f"target has shape {tuple(target.shape)}; expected "
                         f"[N={sample.shape[0]}, d_output={cfg.d_output}]")
    x = sample.detach().to(coder.device, torch.float32)
    y = target.detach().to(coder.device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    f = cfg.n_features
    b_dec = _centre(y, bias)
    centre_in = b_dec if cfg.kind == "sae" else _centre(x, bias)

    if method == "data":
        n = x.shape[0]
        idx = torch.randperm(n, generator=gen)[:f] if n >= f else torch.randint(n, (f,), generator=gen)
        w_enc = _unit_rows(x[idx].cpu() - centre_in.cpu())
        w_dec = _unit_rows(y[idx].cpu() - b_dec.cpu())
        if n < f:
            logger.info("sample has %d rows < %d features: drawing with replacement plus noise", n, f)
            w_enc = _unit_rows(w_enc + 0.01 * torch.randn(w_enc.shape, generator=gen))
            w_dec = _unit_rows(w_dec + 0.01 * torch.randn(w_dec.shape, generator=gen))
        if cfg.kind == "sae":
            w_dec = w_enc
    else:
        w_enc = _kaiming(f, cfg.d_in, gen)
        tied = method == "transpose" and cfg.kind == "sae"
        w_dec = _unit_rows(w_enc) if tied else _unit_rows(torch.randn(f, cfg.d_output, generator=gen), inplace=True)

    if not calibrate:
        w_enc = _unit_rows(w_enc).mul_(encoder_norm)
    kw = {"device": coder.device, "dtype": coder.dtype}
    w_enc, w_dec = w_enc.to(**kw), w_dec.to(**kw)
    b_enc = torch.zeros(f, **kw) if cfg.kind == "sae" else -(w_enc @ centre_in.to(**kw))
    coder.W_dec.copy_(w_dec)
    coder.b_dec.copy_(b_dec.to(**kw))
    coder._set_encoder(w_enc, b_enc)
    if coder.W_skip is not None:
        coder.W_skip.zero_()
    if calibrate:
        _calibrate_scale(coder, x.to(coder.dtype), y.to(coder.dtype))
