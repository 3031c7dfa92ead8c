"""The sparse path: a coder step that does only the work its math needs.

For a top-k-family coder on a batch x [B, D_in] with F features and about K active per token:

    forward   pre  = (x - b_dec) @ W_enc.T + b_enc    the one dense GEMM (2·B·D·F FLOP), done in
                                                       row chunks so each [chunk, F] block is
                                                       selected while it is still in cache
              acts = ReLU(selected pre-activations)    a CSR matrix [B, F] with ~B·K entries
              out  = acts @ W_dec + b_dec              embedding_bag over the active rows only
    backward  d acts  = (d out @ W_dec.T) at the active entries     (sampled dense-dense product)
              d W_dec = acts.T @ d out                              (sparse-dense product)
              d W_enc = (d pre).T @ (x - b_dec),  d b_enc = column sums of d pre
              d b_dec = sum of d out - (column sums of d pre) @ W_enc

so everything after the encoder GEMM costs O(B·K·D) rather than O(B·F·D), no [B, F] tensor is
materialised in the backward, and no [B, K, D] gather either. On the CPU, with a C compiler, three
steps run in compiled kernels (coders/kernels.py): TopK's selection adds b_enc as it scans the
GEMM's block (one pass, no bias broadcast), and the weight gradients and the decoder's d acts are
computed feature by feature from a counting sort of the entries, d W_dec and d acts in one pass.
The gradients are those of the eager reference (`SparseCoder.forward` + autograd) up to float
rounding; tests/unit/test_sparse.py checks loss and every gradient for each architecture that takes
this path, with the kernels and without.

In training the trainer passes a `sink` (train/sparse_adam.SparseAdamStep): W_enc's and W_dec's
gradients then go to it as their sparse factors (it takes the Adam steps row by row, no [F, D]
gradient stored); the encoder's centre is folded into its bias (x @ W_enc.T + b_enc - W_enc @ b_dec,
no centred copy of x) and the input scale rides on the GEMM; the GEMM runs in feature blocks
(FEATURE_BLOCK) with each row's top-k heap carried across them; and the encoder block and the
decoder's output share the sink's workspace memory (`Workspace`, "scratch"), so a step allocates
none of its large temporaries afresh.

On a CPU whose oneDNN multiplies in bf16 much faster than in fp32 (AMX, AVX512-BF16: probed once,
`bf16_screen_usable`), the training step's TopK encoder is screened: the GEMM runs at bf16
precision, each row keeps its k + 64 best approximate candidates, their exact fp32 values are
computed and the exact top k taken, and a bound on the bf16 error proves per row that no other
feature could have made it (rows it cannot prove are redone in fp32). The selection is the fp32
one and the values are fp32 dot products (`TopKSelection.block_bias_screened`): in the [O1.3]
step's profile the GEMM took 38.5 ms against 166 in fp32. MONOSEMANTIC_BF16_SCREEN=0 turns it off.

Selections (`TopKSelection`, `BatchTopKSelection`, `ThresholdSelection`) turn pre-activations into the
active set. Shapes: B batch, D width, F features, K active per row, N active entries in the batch.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F_
from torch import Tensor

from . import kernels

CHUNK_ROWS = 512
"""Rows per encoder block (512: GEMMs of 256 rows ran about 10% slower in the step)."""

FEATURE_BLOCK = 4608
"""Features per encoder GEMM on the fused TopK path (F split evenly into blocks of at most this
many). MKL packs the whole right-hand matrix into a buffer of its own on every call and keeps it:
28 MB for W_enc [9216, 576], 14 MB for half of it. Each row's k-heap is carried from block to block
(`kernels.topk_bias(..., into=)`), and the [512, block] output is 9.4 MB instead of 19. In the
[O1.3] benchmark's worker (2 runs each): train RSS 1.64x the floor at 68% of the sparse ceiling
with 4,608, 1.75x at 67% with the whole 9,216, 1.59x at 61% with 2,304 (four blocks: the later
blocks' heap work)."""

def screen_error(d: int) -> float:
    """Bound on |bf16-precision GEMM - exact| for one entry of a width-d product, as a multiple of
    ||x|| ||w||: bf16 rounds each input to nearest with relative error 2^-8, so a product is off by
    at most (2^-7 + 2^-16) |x_i| |w_i|; fp32 accumulation of d terms, in any order, adds at most
    d x 2^-24 of the sum of |x_i w_i|; and that sum is at most ||x|| ||w|| (Cauchy-Schwarz). A
    quarter more for the roundings around it. 0.0098 at d = 576, where the measured worst case on
    the [O1.3] coder was 6-8% of it."""
    return 1.25 * (2.0 ** -7 + 2.0 ** -16 + d * 2.0 ** -24)

SCREEN_MARGIN = 64
"""Candidates beyond k that a screened row keeps (`TopKSelection.block_bias_screened`). On the
[O1.3] coder (9,216 features, k = 32) k + 64 left 0-0.6% of rows to the exact fallback, k + 32
43-54%."""

SCREEN_FEW = 32
"""Rows the screen leaves undecided are redone by `kernels.sampled_dot` over every feature when
there are at most this many (a GEMV each, 1-2 ms), else by the fp32 GEMM: MKL keeps a packing
buffer the size of W_enc's block (14 MB) once it has run, which the screened step otherwise never
needs."""

_SCREEN_ENV = "MONOSEMANTIC_BF16_SCREEN"
_screen_state: dict[str, bool] = {}


def bf16_screen_usable() -> bool:
    """Whether the encoder GEMM in training may be screened in bf16 precision: on when this
    machine's oneDNN runs [256, 576] x [576, 1024] at bf16 precision at least 1.5x faster than
    fp32 (CPUs with AMX or AVX512-BF16) and within half of `screen_error`'s bound on that product
    (a oneDNN that truncated instead of rounding would fail it); measured once per process.
    MONOSEMANTIC_BF16_SCREEN=0 turns it off, =1 on regardless (tests)."""
    env = os.environ.get(_SCREEN_ENV, "")
    if env in ("0", "1"):
        return env == "1"
    if "usable" not in _screen_state:
        _screen_state["usable"] = _screen_probe()
    return _screen_state["usable"]


def _screen_probe() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    x, W = torch.randn(256, 576), torch.randn(1024, 576)  # small: no lasting memory
    out = torch.empty(256, 1024)

    def rate(bf16: bool) -> float:
        with _bf16_precision(bf16):
            torch.mm(x, W.T, out=out)
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(x, W.T, out=out)
            return time.perf_counter() - start

    try:
        if rate(True) * 1.5 > rate(False):
            return False
        with _bf16_precision():  # and its error within half the bound the proof assumes
            torch.mm(x, W.T, out=out)
    except RuntimeError:
        return False
    x, W = x[:64], W[:256]  # a corner of the product, checked in float64 (a few MB at most)
    err = (out[:64, :256].double() - x.double() @ W.double().T).abs()
    return bool((err <= 0.5 * screen_error(x.shape[1]) * torch.outer(x.norm(dim=1), W.norm(dim=1)).double()).all())


class _bf16_precision:
    """oneDNN's fp32 matmuls at bf16 precision (fp32 in and out, bf16 products, fp32
    accumulation) inside the block, when `on`."""

    def __init__(self, on: bool = True):
        self.on = on

    def __enter__(self):
        if self.on:
            self.saved = torch.backends.mkldnn.matmul.fp32_precision
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"

    def __exit__(self, *exc):
        if self.on:
            torch.backends.mkldnn.matmul.fp32_precision = self.saved


class Workspace:
    """Buffers a training loop reuses from step to step, so that no step allocates its large
    temporaries afresh (no fresh pages to fault in, and nothing for the allocator to keep once
    freed: glibc's heap otherwise holds on to the freed blocks of earlier steps).

    `get(name, shape, like)` returns a tensor of that shape over the buffer `name`, grown (never
    shrunk) when needed; its contents are whatever the last user left. A buffer must not be read
    after the step that wrote it."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = like.new_empty(n)
        return buf[:n].view(shape)


class ActiveSet(NamedTuple):
    """The non-zero activations of a batch as a CSR matrix [B, F]."""

    values: Tensor
    """[N] activations (>= 0); differentiable when built by `sparse_encode`."""
    index: Tensor
    """[N] int64 feature of each entry."""
    offsets: Tensor
    """[B + 1] int64: row b's entries are values[offsets[b]:offsets[b + 1]]."""

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    def rows(self) -> Tensor:
        """[N] int64 the row of each entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.n_rows, device=counts.device), counts)

    def to_dense(self, n_features: int) -> Tensor:
        """[B, F] the dense activation matrix (zeros where inactive)."""
        dense = self.values.new_zeros(self.n_rows, n_features)
        return dense.index_put_((self.rows(), self.index), self.values, accumulate=True)

    def fired(self, n_features: int) -> Tensor:
        """[F] bool: features with a positive activation somewhere in the batch."""
        hit = torch.zeros(n_features, dtype=torch.bool, device=self.index.device)
        return hit.index_fill_(0, self.index[self.values.detach() > 0], True)

    def l0(self) -> float:
        """Mean number of positive activations per row."""
        return float((self.values.detach() > 0).sum()) / max(1, self.n_rows)


class Selection:
    """Turns pre-activations into the active set, one block of rows at a time.

    `block(pre [b, F])` returns a part; `finish(parts)` returns (counts [B] int64, index [N] int64,
    values [N]) with entries in row order and values the raw pre-activations (the ReLU is applied by
    `sparse_encode`), or None when the parts cannot decide exactly and the blocks must be redone
    with `widen()`. A part must not hold a view of `pre`: the block's memory is reused."""

    def block(self, pre: Tensor):
        raise NotImplementedError

    def finish(self, parts: list) -> tuple[Tensor, Tensor, Tensor] | None:
        counts, index, values = zip(*parts)
        return torch.cat(counts), torch.cat(index), torch.cat(values)

    def widen(self) -> "Selection":
        raise RuntimeError(f"{type(self).__name__} cannot widen")


class TopKSelection(Selection):
    """The k largest pre-activations of each row (TopK)."""

    def __init__(self, k: int):
        self.k = k

    def block(self, pre: Tensor):
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return self._part(vals, idx)

    def block_bias(self, pre: Tensor, bias: Tensor):
        """block(pre + bias), through the compiled kernel (`kernels.topk_bias`): no pass to add
        the bias, no copy of the rows."""
        return self._part(*kernels.topk_bias(pre, bias, self.k))

    def block_bias_split(self, x: Tensor, W: Tensor, bias: Tensor, buffer: Tensor, width: int,
                         alpha: float = 1.0):
        """block(x @ W.T + bias) for rows x [r, D], computed `width` features at a time into
        `buffer` (>= r * width floats), each block offered in turn to the rows' k-heaps (the
        compiled kernel adds the bias; a later block only passes the entries that beat a row's
        k-th largest so far). `alpha`: the GEMM computes alpha * x @ W.T."""
        r, n = x.shape[0], W.shape[0]
        if width >= n or width < self.k:
            return self.block_bias(_mm(x, W, buffer[:r * n].view(r, n), alpha), bias)
        found = None
        for j in range(0, n, width):
            w = min(width, n - j)
            pre = _mm(x, W[j:j + w], buffer[:r * w].view(r, w), alpha)
            found = kernels.topk_bias(pre, bias[j:j + w], self.k, into=found, offset=j)
        return self._part(*found)

    def block_bias_screened(self, x: Tensor, W: Tensor, bias: Tensor, buffer: Tensor, width: int,
                            alpha: float, w_max: float, centre: tuple[Tensor, Tensor] | None = None,
                            margin: int = SCREEN_MARGIN):
        """block_bias_split's result, exactly (the same selection, values to fp32 rounding), with
        the GEMM at bf16 precision:
        1. the GEMM in bf16 precision, each row's k + margin largest approximate entries kept
           (the candidates). Rows go through `buffer` at the full width, as many at a time as it
           holds (256 of [O1.3]'s 9,216 features), so no heap is carried across feature blocks
           (a heap of k + margin is as fast as one of k over a whole row, 4-6x slower when
           carried);
        2. the candidates' exact values (`kernels.sampled_dot`, fp32), and the k largest of them;
        3. a row is done when no other feature can beat its exact k-th value: every
           non-candidate's approximate value is at most the smallest candidate's, and its error at
           most screen_error(D) |alpha| ||x|| w_max (w_max >= every row norm of W);
        4. rows not done are redone in fp32 (`kernels.sampled_dot` over every feature for a few
           rows, else `block_bias_split`).
        `centre` = (c, b): `bias` is b - W c, folded; step 1 then runs on alpha x - c (a few rows
        at a time) with b, since the error grows with the norm of what the GEMM is given, and an
        uncentred x is far longer (the massive-activation dimension)."""
        r, n = x.shape[0], W.shape[0]
        wide = self.k + margin
        if wide >= n or r == 0:
            return self.block_bias_split(x, W, bias, buffer, width, alpha)
        rows = buffer.numel() // n
        if rows < 1:  # not one whole row in the buffer: no screening
            return self.block_bias_split(x, W, bias, buffer, width, alpha)
        approx, cand = x.new_empty(r, wide), torch.empty(r, wide, dtype=torch.int64)
        norms = x.new_empty(r)  # of what the approximate GEMM multiplies
        neg_c = None if centre is None else -centre[0]
        with _bf16_precision():
            for i in range(0, r, rows):
                m = min(rows, r - i)
                if centre is None:
                    pre = _mm(x[i:i + m], W, buffer[:m * n].view(m, n), alpha)
                    plain = bias
                    torch.linalg.vector_norm(x[i:i + m], dim=1, out=norms[i:i + m]).mul_(abs(alpha))
                else:
                    xc = torch.add(neg_c, x[i:i + m], alpha=alpha)  # alpha x - c, one pass
                    pre = torch.mm(xc, W.T, out=buffer[:m * n].view(m, n))
                    plain = centre[1]
                    torch.linalg.vector_norm(xc, dim=1, out=norms[i:i + m])
                approx[i:i + m], cand[i:i + m] = kernels.topk_bias(pre, plain, wide)
        offsets = torch.arange(0, r * wide + 1, wide, dtype=torch.int64)
        exact = kernels.sampled_dot(offsets, cand.view(-1), x, W).view(r, wide)
        exact = exact.mul_(alpha).add_(bias[cand])
        vals, pos = exact.topk(self.k, dim=1, sorted=False)
        idx = cand.gather(1, pos)
        low, kth = approx.amin(dim=1), vals.amin(dim=1)
        # the GEMM's error; the fp32 roundings of the exact values' dots (in the folded form, D x
        # 2^-23 of the parts' norms), of centring, and of adding the bias (2^-20 of the values)
        d = x.shape[1]
        scaled = norms if centre is None else abs(alpha) * torch.linalg.vector_norm(x, dim=1)
        slack = d * 2.0 ** -23 * w_max * (scaled + (0.0 if centre is None else float(centre[0].norm())))
        reach = low + screen_error(d) * w_max * norms + 2.0 ** -20 * (low.abs() + kth.abs()) + slack
        redo = (reach >= kth).nonzero().flatten()
        if 0 < len(redo) <= SCREEN_FEW:  # a few rows: all their dots, no BLAS packing buffer
            full = torch.arange(n, dtype=torch.int64).repeat(len(redo))
            offsets = torch.arange(0, len(redo) * n + 1, n, dtype=torch.int64)
            pre = kernels.sampled_dot(offsets, full, x[redo], W).view(len(redo), n).mul_(alpha)
            vals[redo], idx[redo] = kernels.topk_bias(pre, bias, self.k)
            redo = redo[:0]
        fit = max(1, buffer.numel() // min(width, n))  # rows block_bias_split's buffer holds
        for i in range(0, len(redo), fit):
            rows_ = redo[i:i + fit]
            _, fidx, fvals = self.block_bias_split(x[rows_], W, bias, buffer, width, alpha)
            vals[rows_], idx[rows_] = fvals.view(-1, self.k), fidx.view(-1, self.k)
        return self._part(vals, idx)

    def _part(self, vals: Tensor, idx: Tensor):
        counts = torch.full((vals.shape[0],), self.k, dtype=torch.int64, device=vals.device)
        return counts, idx.flatten(), vals.flatten()


def _mm(x: Tensor, W: Tensor, out: Tensor, alpha: float) -> Tensor:
    """out = alpha * x @ W.T (BLAS takes alpha for free; beta = 0 ignores out's contents)"""
    if alpha == 1.0:
        return torch.mm(x, W.T, out=out)
    return torch.addmm(out, x, W.T, beta=0.0, alpha=alpha, out=out)


class ThresholdSelection(Selection):
    """Pre-activations above a threshold, a scalar or one per feature [F] (JumpReLU, and BatchTopK
    at inference)."""

    def __init__(self, threshold: Tensor | float):
        self.threshold = threshold

    def block(self, pre: Tensor):
        mask = pre > self.threshold
        rows, idx = mask.nonzero(as_tuple=True)
        return mask.sum(1), idx, pre[rows, idx]


class BatchTopKSelection(Selection):
    """The k·B largest ReLU'd pre-activations of the whole batch (BatchTopK training), exactly,
    without a [B, F] matrix: each block keeps its rows' top c candidates (c = 4k at first);
    tau = the (k·B)-th largest candidate. If every row's c-th candidate is below tau, no row has a
    selected entry outside its candidates, so the candidates' top k·B is the batch's. Otherwise
    (one row holding more than c of the batch's largest values) the blocks are redone with c = F.

    `reduce` makes the batch span several processes (data-parallel training): given this process's
    candidates [B_r, c] (ReLU'd), k and whether the widening check applies, it returns (tau, widen)
    for the global batch, the same on every process (train/distributed.Parallel.batch_threshold)."""

    def __init__(self, k: int, n_features: int, candidates: int = 0, reduce=None):
        self.k, self.n_features, self.reduce = k, n_features, reduce
        self.c = min(candidates or 4 * k, n_features)

    def widen(self) -> "BatchTopKSelection":
        return BatchTopKSelection(self.k, self.n_features, self.n_features, self.reduce)

    def block(self, pre: Tensor):
        return pre.topk(self.c, dim=-1)  # sorted: the last column is each row's c-th candidate

    def finish(self, parts: list):
        vals = torch.cat([p.values for p in parts])  # [B, c]
        idx = torch.cat([p.indices for p in parts])
        n_rows = vals.shape[0]
        flat = vals.flatten().clamp_min(0)
        check = self.c < self.n_features
        if self.reduce is not None:
            tau, widen = self.reduce(vals.clamp_min(0), self.k, check)
        else:
            tau = batch_threshold(flat, self.k * n_rows)
            last = vals[:, -1]  # everything a row left out is <= its last candidate
            widen = check and bool(((last > 0) & (last >= tau)).any())
        if widen:
            return None
        # every entry >= tau (ties at tau included, so the selection does not depend on how the
        # batch is split between processes), in row order
        pos = ((flat >= tau) & (flat > 0)).nonzero(as_tuple=True)[0]
        return torch.bincount(pos // self.c, minlength=n_rows), idx.flatten()[pos], vals.flatten()[pos]


def batch_threshold(values: Tensor, n: int) -> Tensor:
    """The n-th largest of `values` (>= 0), the BatchTopK selection's cut: it keeps every
    positive value >= it. 0 when there are at most n values."""
    if values.numel() <= n or n <= 0:
        return values.new_zeros(()) if n > 0 or values.numel() == 0 else values.max() + 1
    return values.topk(n, sorted=False).values.min()


DENSE_ABOVE = 0.1
"""Density (active entries / rows x features) above which a weight gradient S^T @ X is taken
through a dense S. The transposed-CSR product costs about the same whatever the density (~100 ms
for [4096, F]^T @ [4096, 576] at 2 threads, ~10 ms at k = 32 of 9,216), the dense one grows with
F (4 ms at F = 116, 42 ms at 2,000): they cross between 3% and 14%. AuxK over a few hundred dead
features selects nearly all of them for every token (k_aux = D / 2)."""


def _dense(offsets: Tensor, values: Tensor, n_features: int) -> bool:
    return values.numel() > DENSE_ABOVE * (offsets.numel() - 1) * n_features


def _t_matmul(offsets: Tensor, index: Tensor, values: Tensor, n_features: int, rhs: Tensor) -> Tensor:
    """S^T @ rhs [F, D] for the [B, F] active set S given as CSR parts."""
    dense = _dense(offsets, values, n_features)
    if not dense and kernels.usable_for(values, rhs):
        return kernels.t_matmul(offsets, index, values, n_features, rhs)[0]
    S = _csr(offsets, index, values, n_features)
    return S.to_dense().T @ rhs if dense else S.t() @ rhs


def _csr(offsets: Tensor, index: Tensor, values: Tensor, n_features: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(offsets, index, values, (offsets.numel() - 1, n_features),
                                       check_invariants=False)


class _Encode(torch.autograd.Function):
    """(x, centre, W_enc, b_enc) -> the ReLU'd selected pre-activations of (x - centre) as CSR."""

    @staticmethod
    def forward(ctx, x: Tensor, centre: Tensor | None, W_enc: Tensor, b_enc: Tensor,
                select: Selection, chunk: int, sink=None, scale: float = 1.0,
                gemm_scale: bool = False):
        # In training (a sink): (x - centre) @ W_enc.T + b_enc = x @ W_enc.T + (b_enc - W_enc @ centre),
        # the centre folded into the bias, so no centred [B, D] copy of x is made, nor kept for the
        # backward. Elsewhere x is centred first, as the eager forward does, so that thresholds
        # (JumpReLU, BatchTopK at inference) see the same rounding on either path.
        # `scale` (the training's input scale) rides on the GEMM with a sink (or when asked:
        # `gemm_scale`, AuxK's dead features in training), else x is scaled first
        if scale != 1.0 and sink is None and not gemm_scale:
            x, scale = x * scale, 1.0
        fold = centre is not None and sink is not None
        xin = x if centre is None or fold else x - centre
        plain_b = b_enc
        if fold:
            b_enc = torch.addmv(b_enc, W_enc, centre, alpha=-1)
        # TopK with the compiled kernels: the GEMM without the bias, which the selection adds, in
        # blocks of features (see FEATURE_BLOCK)
        fused = isinstance(select, TopKSelection) and kernels.usable_for(xin, W_enc, b_enc)
        n_features, rows = W_enc.shape[0], min(chunk, xin.shape[0])
        width = -(-n_features // -(-n_features // FEATURE_BLOCK)) if fused else n_features
        # one block reused for every chunk (no fresh pages per chunk); selections copy what they
        # keep out of it. In training, the workspace's "scratch", which the decoder's output
        # reuses once the block is done with (both 9.4 MB in the [O1.3] configuration)
        space = getattr(sink, "workspace", None)
        block = xin.new_empty(rows * width) if space is None else space.get("scratch", (rows * width,), xin)
        # in training, on a CPU whose bf16 GEMM is fast: screened (the same selection, exactly)
        screen = fused and sink is not None and bf16_screen_usable()
        w_max = float(torch.linalg.vector_norm(W_enc.detach(), dim=1).max()) if screen else 0.0
        while True:
            parts = [select.block_bias_screened(xin[i:i + chunk], W_enc, b_enc, block, width, scale,
                                                w_max, (centre, plain_b) if fold else None) if screen
                     else select.block_bias_split(xin[i:i + chunk], W_enc, b_enc, block, width, scale) if fused
                     else select.block(torch.addmm(b_enc, xin[i:i + chunk], W_enc.T, alpha=scale,
                                                   out=block[:r * width].view(r, width)))
                     for i in range(0, xin.shape[0], chunk)
                     for r in [min(chunk, xin.shape[0] - i)]]
            if not parts:  # an empty batch
                result = (x.new_zeros(0, dtype=torch.int64),) * 2 + (x.new_zeros(0),)
                break
            result = select.finish(parts)
            if result is not None:
                break
            select = select.widen()
        counts, index, values = result
        offsets = F_.pad(counts.cumsum(0), (1, 0))
        values = values.clamp_min(0)
        ctx.save_for_backward(xin, W_enc, index, offsets, values, centre if fold else None)
        ctx.has_centre = centre is not None
        ctx.sink, ctx.scale = sink, scale
        ctx.mark_non_differentiable(index, offsets)
        return values, index, offsets

    @staticmethod
    def backward(ctx, d_values: Tensor, _d_index, _d_offsets):
        xin, W_enc, index, offsets, values, centre = ctx.saved_tensors
        n_features = W_enc.shape[0]
        g = d_values * (values > 0)  # the ReLU
        gs = g if ctx.scale == 1.0 else g * ctx.scale  # the GEMM's input was scale * xin
        need_x, need_centre, need_w, need_b = ctx.needs_input_grad[:4]
        sink = ctx.sink if need_w else None
        d_b = torch.zeros(n_features, dtype=g.dtype, device=g.device).index_add_(0, index, g)
        d_W = None
        if need_w and sink is None:  # S^T (x - centre) = S^T x - (column sums of S) (x) centre
            d_W = _t_matmul(offsets, index, gs, n_features, xin)
            if centre is not None:
                d_W.addr_(d_b, centre, alpha=-1)
        d_x = (_csr(offsets, index, gs, n_features) @ W_enc) if need_x else None
        # sum over rows of S @ W_enc = (column sums of S) @ W_enc = d_b @ W_enc
        d_centre = -(d_b @ W_enc) if (ctx.has_centre and need_centre) else None
        if sink is not None:  # last: the sink may update W_enc in place (train/sparse_adam.py)
            sink.take("W_enc", offsets, index, gs, xin, minus=None if centre is None else (d_b, centre))
        return d_x, d_centre, d_W, d_b if need_b else None, None, None, None, None, None


class _Decode(torch.autograd.Function):
    """(values, index, offsets, W_dec) -> acts @ W_dec [B, D_out] through the active rows only."""

    @staticmethod
    def forward(ctx, values: Tensor, index: Tensor, offsets: Tensor, W_dec: Tensor, sink=None,
                bias: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(values, index, offsets, W_dec)
        ctx.sink = sink
        space = getattr(sink, "workspace", None)
        if space is not None and kernels.usable_for(values, W_dec):  # training: into the scratch
            out = space.get("scratch", (offsets.numel() - 1, W_dec.shape[1]), values)
            return kernels.decode_rows(offsets, index, values, W_dec, bias, out)
        out = F_.embedding_bag(index, W_dec, offsets, mode="sum", per_sample_weights=values,
                               include_last_offset=True)
        return out if bias is None else out.add_(bias)  # in place: no second [B, D]

    @staticmethod
    def backward(ctx, d_out: Tensor):
        values, index, offsets, W_dec = ctx.saved_tensors
        d_values = d_W = None
        d_out = d_out.contiguous()
        n_features = W_dec.shape[0]
        d_bias = d_out.sum(0) if ctx.needs_input_grad[5] else None
        if ctx.sink is not None and ctx.needs_input_grad[3]:  # W_dec's gradient goes to the sink
            d_values = ctx.sink.take("W_dec", offsets, index, values, d_out,
                                     dots_with=W_dec if ctx.needs_input_grad[0] else None)
            return d_values, None, None, None, None, d_bias
        if (all(ctx.needs_input_grad[i] for i in (0, 3)) and not _dense(offsets, values, n_features)
                and kernels.usable_for(values, d_out, W_dec)):
            # both in one pass over the entries (each d_out row read once, not twice)
            d_W, d_values = kernels.t_matmul(offsets, index, values, n_features, d_out, W_dec)
            return d_values, None, None, d_W, None, d_bias
        if ctx.needs_input_grad[0]:
            pattern = _csr(offsets, index, torch.ones_like(values), n_features)
            d_values = torch.sparse.sampled_addmm(pattern, d_out, W_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[3]:
            d_W = _t_matmul(offsets, index, values, n_features, d_out)
        return d_values, None, None, d_W, None, d_bias


def sparse_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, select: Selection,
                  centre: Tensor | None = None, chunk: int = CHUNK_ROWS, sink=None,
                  scale: float = 1.0, gemm_scale: bool = False) -> ActiveSet:
    """The active set of ReLU(select((x - centre) @ W_enc.T + b_enc)), differentiable in x,
    centre, W_enc and b_enc through the selected entries. With a `sink`
    (train/sparse_adam.SparseAdamStep) W_enc gets no .grad: its gradient's factors go to
    `sink.take("W_enc", ...)` instead, and `scale` (the input is scale * x) rides on the GEMM;
    without one, `gemm_scale` asks for the same (else scale * x is made first)."""
    values, index, offsets = _Encode.apply(x, centre, W_enc, b_enc, select, chunk, sink, scale,
                                           gemm_scale)
    return ActiveSet(values, index, offsets)


def sparse_decode(active: ActiveSet, W_dec: Tensor, sink=None, bias: Tensor | None = None) -> Tensor:
    """[B, D_out] = acts @ W_dec (+ bias [D_out], added in place) over the active entries. With a
    `sink`, W_dec's gradient goes to `sink.take("W_dec", ...)` instead of .grad."""
    return _Decode.apply(active.values, active.index, active.offsets, W_dec, sink, bias)


class _Rows(torch.autograd.Function):
    """W[rows], whose gradient goes to `sink.take_rows(name, rows, grad)` instead of a dense [F, D]
    gradient of W."""

    @staticmethod
    def forward(ctx, W: Tensor, rows: Tensor, sink, name: str) -> Tensor:
        ctx.rows, ctx.sink, ctx.name = rows, sink, name
        return W.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.sink.take_rows(ctx.name, ctx.rows, grad)
        return None, None, None, None


def gather_rows(W: Tensor, rows: Tensor, sink=None, name: str = "") -> Tensor:
    """W[rows] (differentiable); with a `sink`, the rows' gradient goes to it under `name`."""
    return W[rows] if sink is None else _Rows.apply(W, rows, sink, name)


class _SquaredError(torch.autograd.Function):
    """sum((pred - scale * target)^2) in one pass (a compiled kernel, or blocks of rows):
    F.mse_loss makes the whole [B, D] error first. The backward makes the one [B, D] it must, the
    gradient, or writes it over pred."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, overwrite: bool, scale: float) -> Tensor:
        ctx.save_for_backward(pred, target)
        ctx.overwrite, ctx.scale = overwrite, scale
        ctx.fast = (pred.ndim == 2 and pred.shape == target.shape and pred.is_contiguous()
                    and target.stride(1) == 1 and kernels.usable_for(pred, target))
        if ctx.fast:
            return pred.new_tensor(kernels.squared_error(pred, target, scale))
        total = pred.new_zeros((), dtype=torch.float64)
        for i in range(0, pred.shape[0], 256):
            total += (pred[i:i + 256] - scale * target[i:i + 256]).square_().sum()
        return total.to(pred.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pred, target = ctx.saved_tensors
        if ctx.fast and ctx.overwrite:
            d = kernels.squared_error_grad_(pred, target, ctx.scale, 2 * float(grad))
        else:
            d = torch.sub(pred, target, alpha=ctx.scale, out=pred if ctx.overwrite else None).mul_(2 * grad)
        return d, (-ctx.scale * d if ctx.needs_input_grad[1] else None), None, None


def squared_error(pred: Tensor, target: Tensor, overwrite: bool = False, scale: float = 1.0) -> Tensor:
    """sum((pred - scale * target)^2) over every element, differentiable in both; no [B, D]
    temporary. `overwrite`: the backward writes pred's gradient over pred itself (no [B, D]
    allocated), for a pred that no other backward reads."""
    return _SquaredError.apply(pred, target, overwrite, scale)
