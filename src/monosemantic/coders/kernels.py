"""The sparse path's fused CPU kernels (kernels.c), compiled once per machine with its C compiler.

The kernels replace PyTorch ops in coders/sparse.py (and the decoder-norm steps of coders/base.py)
where those do work the math does not need:

- `topk_bias(pre, bias, k)`: the k largest entries of each row of pre + bias. `torch.topk` copies
  every row into (value, index) pairs and partially sorts them, and the bias needs its own pass
  (addmm broadcasts it into the GEMM's output first); here one scan per row keeps a k-entry heap
  and skips any 16 values none of which beats its smallest.
- `t_matmul(offsets, index, values, F, R)`: S^T @ R [F, D] for a CSR S [B, F], by a counting sort
  of the entries by feature and one pass per feature writing its output row once (no zero fill
  of the [F, D] result, no CSR transposition through a general sort).
- `project_rows(W, G)` / `unit_rows(W)`: the decoder-norm constraint's two steps (the gradient's
  component along each decoder row removed; rows renormalised), one pass each instead of three
  and two.

Training's own (train/loop.py, train/sparse_adam.py):

- `sparse_adam(...)`: one Adam step of W_enc or W_dec whose gradient is S^T @ R (+ dense rows,
  - an outer product), each feature's gradient row formed in a scratch row, projected, applied
  and renormalised in turn: no [F, D] gradient is ever stored. With `dots=True` it also returns
  the decoder's d acts from the same pass. `sampled_dot` gives those dots alone.
- `topk_bias(..., into=, offset=)`: a later block of columns of the same rows, merged into the
  rows' k-heaps (the encoder GEMM in feature blocks).
- `decode_rows(...)`: the embedding-bag decoder plus its bias into a given buffer.
- `batch_stats(x)`: one pass for finiteness, the rows' norms and the variance's sums;
  `squared_error` / `squared_error_grad_`: the loss and its in-place gradient, one pass each.

The shared library is built by `cc -O3 -fno-math-errno -march=native -shared` (with `-fopenmp` where PyTorch's
libgomp is loaded, so the kernels share its threads) into the cache folder
(`$MONOSEMANTIC_CACHE/kernels/`, keyed by the source, the compiler and the CPU's flags), written
atomically, and loaded with ctypes: no Python headers, no pickles, about a second to compile.
Without a C compiler (or with `MONOSEMANTIC_KERNELS=0`, or for tensors that are not contiguous
float32 on the CPU) the sparse path uses PyTorch ops alone; both give the same results up to float
rounding, which tests/unit/test_kernels.py checks.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..utils import cache_dir, cpu_flags

log = logging.getLogger(__name__)

ENV = "MONOSEMANTIC_KERNELS"
"""Set to 0 to run the sparse path on PyTorch ops only."""

SOURCE = Path(__file__).with_name("kernels.c")

_lib = None
_tried = False
_lock = threading.Lock()
_i64, _f32 = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float)
_f64 = ctypes.POINTER(ctypes.c_double)


def enabled() -> bool:
    """Whether the compiled kernels are in use (compiling them on first call)."""
    return _load() is not None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _gomp_loaded() -> bool:
    """Whether GNU OpenMP is already loaded in this process (PyTorch's own libgomp, as in its
    Linux wheels): then -fopenmp binds the kernels to that same runtime. With another runtime (or
    none) the kernels use POSIX threads rather than load a second OpenMP beside PyTorch's."""
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def _build(cc: str, out: Path, openmp: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        err = ""
        # -fopenmp binds to PyTorch's OpenMP runtime (see kernels.c); without it, POSIX threads.
        # Some compilers (or CPUs) have no -march=native or no OpenMP: try without them.
        omp = [["-march=native", "-fopenmp"], ["-fopenmp"]] if openmp else []
        for flags in (*omp, ["-march=native"], []):
            # -fno-math-errno: sqrtf vectorises (no errno is read anywhere)
            cmd = [cc, "-O3", "-fno-math-errno", *flags, "-std=c99", "-fPIC", "-shared", "-pthread", str(SOURCE), "-o", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)
                return
            err = r.stderr
        raise RuntimeError(err.strip()[-2000:])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        cc = _compiler()
        if cc is None:
            log.info("no C compiler found: the sparse path runs on PyTorch ops only")
            return None
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
            openmp = _gomp_loaded()
            parts = (SOURCE.read_text(), cc, version, platform.machine(), cpu_flags(), str(openmp))
            key = hashlib.sha256(b"\0".join(p.encode() for p in parts)).hexdigest()[:16]
            path = cache_dir() / "kernels" / f"sparse-{key}.so"
            if not path.exists():
                _build(cc, path, openmp)
                for old in path.parent.glob("sparse-*.so"):  # earlier sources' builds: 1 s to redo
                    if old != path:
                        old.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("could not build the sparse path's C kernels (%s): using PyTorch ops only", e)
            return None
        lib.topk_bias.argtypes = [_f32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _f32,
                                  ctypes.c_int64, _f32, _i64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.topk_bias.restype = None
        lib.t_matmul.argtypes = [_i64, _i64, _f32, ctypes.c_int64, ctypes.c_int64, _f32,
                                 ctypes.c_int64, ctypes.c_int64, _f32, _f32, _f32, ctypes.c_int]
        lib.t_matmul.restype = ctypes.c_int
        lib.decode_rows.argtypes = [_i64, _i64, _f32, ctypes.c_int64, _f32, _f32, ctypes.c_int64,
                                    _f32, ctypes.c_int]
        lib.decode_rows.restype = None
        lib.batch_stats.argtypes = [_f32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _f32, _f64,
                                    _f64, ctypes.c_int]
        lib.batch_stats.restype = ctypes.c_int
        lib.squared_error.argtypes = [_f32, _f32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        lib.squared_error.restype = ctypes.c_double
        lib.sampled_dot.argtypes = [_i64, _i64, ctypes.c_int64, _f32, ctypes.c_int64,
                                    ctypes.c_int64, _f32, _f32, ctypes.c_int]
        lib.sampled_dot.restype = None
        lib.sparse_adam.argtypes = [_i64, _i64, _f32, ctypes.c_int64, ctypes.c_int64, _f32,
                                    ctypes.c_int64, ctypes.c_int64, _i64, _f32, _f32, _f32, _f32,
                                    _f32, _f32, *[ctypes.c_float] * 7, ctypes.c_int, ctypes.c_int, _f32, ctypes.c_int]
        lib.sparse_adam.restype = ctypes.c_int
        lib.project_rows.argtypes = [_f32, _f32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        lib.project_rows.restype = None
        lib.unit_rows.argtypes = [_f32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        lib.unit_rows.restype = None
        _lib = lib
        return _lib


def _ptr(t: Tensor, kind):
    return ctypes.cast(t.data_ptr(), kind)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def usable_for(*tensors: Tensor) -> bool:
    """Whether the kernels are in use and can take these float tensors (float32 on the CPU)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and enabled()


def _check_csr(offsets: Tensor, index: Tensor, n_rows: int, n_features: int) -> None:
    """The kernels index memory with these: refuse anything out of range."""
    if offsets.dtype != torch.int64 or index.dtype != torch.int64:
        raise TypeError("CSR offsets and index must be int64")
    if offsets.numel() != n_rows + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != index.numel() \
            or (n_rows and bool((offsets.diff() < 0).any())):
        raise ValueError(f"CSR offsets do not describe {n_rows} rows of {index.numel()} entries")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_features):
        raise IndexError(f"CSR feature index out of range for {n_features} features")


def topk_bias(pre: Tensor, bias: Tensor, k: int, into: tuple[Tensor, Tensor] | None = None,
              offset: int = 0) -> tuple[Tensor, Tensor]:
    """(values [rows, k], indices [rows, k] int64): the k largest entries of each row of
    pre [rows, n] + bias [n], unsorted, indices counted from `offset`. pre's rows must be
    contiguous (any row stride). A row holding NaN gets valid, distinct indices but an
    unspecified selection (torch.topk ranks NaN first).

    `into`: the (values, indices) an earlier call returned for other columns of the same rows (a
    row split into blocks: call with each block and its column offset in turn); updated in place
    to the k largest of everything seen, and returned. The first call needs n >= k."""
    rows, n = pre.shape
    cont = into is not None
    if not 0 <= k <= (n if not cont else k) or tuple(bias.shape) != (n,) or (not cont and n < k):
        raise ValueError(f"topk_bias: k = {k} of {n} columns, bias {tuple(bias.shape)}")
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    bias = bias.detach().contiguous()
    if cont:
        vals, idx = into
        if vals.shape != (rows, k) or idx.shape != (rows, k) or not (vals.is_contiguous() and idx.is_contiguous()) \
                or vals.dtype != torch.float32 or idx.dtype != torch.int64:
            raise ValueError(f"topk_bias: into must be contiguous float32 / int64 [{rows}, {k}]")
    else:
        vals = pre.new_empty(rows, k)
        idx = torch.empty(rows, k, dtype=torch.int64)
    if rows and k and (n or not cont):
        _load().topk_bias(_ptr(pre, _f32), rows, n, pre.stride(0), _ptr(bias, _f32), k,
                          _ptr(vals, _f32), _ptr(idx, _i64), offset, int(cont), _threads())
    return vals, idx


def t_matmul(offsets: Tensor, index: Tensor, values: Tensor, n_features: int, R: Tensor,
             W: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(S^T @ R [F, D], dots [N] or None) for the CSR matrix S [B, F] (offsets [B + 1], index [N],
    values [N]) and R [B, D], each feature's entries summed in row order. With W [F, D], also
    dots[e] = <R[b], W[f]> for each entry e = (b, f), in the same pass over R."""
    offsets, index, values = offsets.contiguous(), index.contiguous(), values.detach().contiguous()
    _check_csr(offsets, index, R.shape[0], n_features)
    if values.numel() != index.numel() or (W is not None and tuple(W.shape) != (n_features, R.shape[1])):
        raise ValueError("t_matmul: values must match index, and W be [n_features, D]")
    if R.stride(1) != 1:
        R = R.contiguous()
    out = R.new_empty(n_features, R.shape[1])
    dots = None
    if W is not None:
        W = W.detach().contiguous()
        dots = R.new_empty(index.numel())
    if _load().t_matmul(_ptr(offsets, _i64), _ptr(index, _i64), _ptr(values, _f32),
                        offsets.numel() - 1, n_features, _ptr(R, _f32), R.shape[1], R.stride(0),
                        _ptr(out, _f32), None if W is None else _ptr(W, _f32),
                        None if dots is None else _ptr(dots, _f32), _threads()) != 0:
        raise MemoryError("t_matmul: out of memory for the feature-sorted entries")
    return out, dots


def decode_rows(offsets: Tensor, index: Tensor, values: Tensor, W: Tensor, bias: Tensor | None,
                out: Tensor) -> Tensor:
    """out [B, D] = bias + S @ W for the CSR matrix S [B, F] (offsets, index, values) and W [F, D],
    written into `out` (contiguous float32) and returned."""
    offsets, index, values = offsets.contiguous(), index.contiguous(), values.detach().contiguous()
    W = W.detach().contiguous()
    B, (F_, D) = offsets.numel() - 1, W.shape
    _check_csr(offsets, index, B, F_)
    if values.numel() != index.numel() or out.shape != (B, D) or not out.is_contiguous() \
            or (bias is not None and bias.shape != (D,)) or not usable_for(values, W, out):
        raise ValueError(f"decode_rows: values must match index, out be contiguous [{B}, {D}] and "
                         f"bias [{D}], all float32 on the CPU")
    if bias is not None:
        bias = bias.detach().contiguous()
    if B:
        _load().decode_rows(_ptr(offsets, _i64), _ptr(index, _i64), _ptr(values, _f32), B, _ptr(W, _f32),
                            None if bias is None else _ptr(bias, _f32), D, _ptr(out, _f32), _threads())
    return out


class BatchStats(NamedTuple):
    finite: bool
    row_sq: Tensor | None
    """[B] each row's sum of squares (float32), when asked for"""
    col_sum: Tensor
    """[D] float64 column sums"""
    total_sq: float
    """the sum of all squares (float64)"""

    def variance(self, n_rows: int, scale: float = 1.0) -> float:
        """sum over rows of ||scale * (x - mean)||^2, from the sums."""
        mean_sq = float(self.col_sum.square().sum()) / max(1, n_rows)
        return max(0.0, self.total_sq - mean_sq) * scale * scale


def batch_stats(x: Tensor, rows: bool = True) -> BatchStats:
    """One pass over x [B, D] (rows contiguous): whether it is finite, each row's sum of squares
    (`rows`), the column sums and the total sum of squares (in float64)."""
    if x.ndim != 2 or x.stride(1) != 1 or not usable_for(x):
        raise ValueError("batch_stats: x must be float32 [B, D] with contiguous rows, on the CPU")
    B, D = x.shape
    row_sq = x.new_empty(B) if rows else None
    col = torch.zeros(D, dtype=torch.float64)
    total = ctypes.c_double(0.0)
    bad = _load().batch_stats(_ptr(x, _f32), B, D, x.stride(0), None if row_sq is None else _ptr(row_sq, _f32),
                              _ptr(col, _f64),
                              ctypes.byref(total), _threads())
    if bad < 0:
        raise MemoryError("batch_stats: out of memory")
    return BatchStats(bad == 0, row_sq, col, total.value)


def squared_error(pred: Tensor, target: Tensor, scale: float = 1.0) -> float:
    """sum((pred - scale * target)^2) over [B, D], accumulated in float64 over rows, one pass."""
    _sq_check(pred, target)
    return _load().squared_error(_ptr(pred, _f32), _ptr(target, _f32), pred.shape[0], pred.shape[1],
                                 target.stride(0), scale, 0.0, 0, _threads())


def squared_error_grad_(pred: Tensor, target: Tensor, scale: float, coef: float) -> Tensor:
    """In place, pred = coef * (pred - scale * target) (the squared error's gradient for
    coef = 2 x the incoming one); one pass. Returns pred."""
    _sq_check(pred, target)
    _load().squared_error(_ptr(pred, _f32), _ptr(target, _f32), pred.shape[0], pred.shape[1],
                          target.stride(0), scale, coef, 1, _threads())
    torch.autograd.graph.increment_version(pred)
    return pred


def _sq_check(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 2 or pred.shape != target.shape or not pred.is_contiguous() \
            or target.stride(1) != 1 or not usable_for(pred, target):
        raise ValueError("squared_error: pred (contiguous) and target (contiguous rows) must be "
                         "float32 tensors of one [B, D] shape on the CPU")


def sampled_dot(offsets: Tensor, index: Tensor, R: Tensor, W: Tensor) -> Tensor:
    """dots [N]: <R[b], W[f]> for each entry (b, f) of the CSR pattern (offsets [B + 1], index [N])
    with R [B, D] and W [F, D]."""
    offsets, index, W = offsets.contiguous(), index.contiguous(), W.detach().contiguous()
    _check_csr(offsets, index, R.shape[0], W.shape[0])
    if R.ndim != 2 or W.shape[1] != R.shape[1]:
        raise ValueError(f"sampled_dot: R {tuple(R.shape)} and W {tuple(W.shape)} differ in width")
    if R.stride(1) != 1:
        R = R.contiguous()
    dots = R.new_empty(index.numel())
    if index.numel():
        _load().sampled_dot(_ptr(offsets, _i64), _ptr(index, _i64), offsets.numel() - 1,
                            _ptr(R, _f32), R.shape[1], R.stride(0), _ptr(W, _f32), _ptr(dots, _f32),
                            _threads())
    return dots


def sparse_adam(offsets: Tensor, index: Tensor, values: Tensor, R: Tensor, W: Tensor, m: Tensor,
                v: Tensor, *, lr: float, beta1: float, beta2: float, eps: float, step: int,
                extra_rows: Tensor | None = None, extra: Tensor | None = None,
                minus: tuple[Tensor, Tensor] | None = None, project: bool = False, unit: bool = False, dots: bool = False) -> Tensor | None:
    """One Adam step (torch.optim.Adam's, without weight decay; `step` counts this one) of W [F, D]
    with moments m, v, in place, for the gradient S^T @ R + (rows `extra_rows` [n] of it: += extra
    [n, D]) - u (x) c for minus = (u [F], c [D]), S the CSR matrix [B, F] (offsets, index, values)
    and R [B, D]. Each feature's gradient
    row is formed, used and dropped in turn: no [F, D] gradient exists. `project`: first remove
    the row's component along W's row; `unit`: renormalise W's row after the step (the
    decoder-norm constraint's two steps). `dots`: also return [N] <R[b], W[f]> for each entry
    (b, f), W as it was before the step (the decoder's d acts), from the same pass over R."""
    offsets, index, values = offsets.contiguous(), index.contiguous(), values.detach().contiguous()
    F_, D = W.shape
    _check_csr(offsets, index, R.shape[0], F_)
    if values.numel() != index.numel() or R.ndim != 2 or R.shape[1] != D:
        raise ValueError(f"sparse_adam: values must match index and R [B, {D}]")
    if not (_rows_ok(W, m, v) and W.shape == m.shape == v.shape):
        raise ValueError("sparse_adam: W, m and v must be contiguous float32 [F, D] on the CPU")
    if step < 1:
        raise ValueError(f"sparse_adam: step counts from 1, got {step}")
    if R.stride(1) != 1:
        R = R.contiguous()
    pos = None
    if extra_rows is not None and extra_rows.numel():
        extra = extra.detach().contiguous()
        if extra.shape != (extra_rows.numel(), D) or int(extra_rows.min()) < 0 or int(extra_rows.max()) >= F_:
            raise ValueError(f"sparse_adam: extra rows must be [n, {D}] for features in [0, {F_})")
        pos = torch.full((F_,), -1, dtype=torch.int64)
        pos[extra_rows] = torch.arange(extra_rows.numel())
        if int((pos >= 0).sum()) != extra_rows.numel():
            raise ValueError("sparse_adam: a feature appears twice in extra_rows")
    if minus is not None:
        u, c = (t.detach().contiguous() for t in minus)
        if u.shape != (F_,) or c.shape != (D,) or not usable_for(u, c):
            raise ValueError(f"sparse_adam: minus must be float32 ([{F_}], [{D}]) on the CPU")
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    out = R.new_empty(index.numel()) if dots else None
    if _load().sparse_adam(_ptr(offsets, _i64), _ptr(index, _i64), _ptr(values, _f32),
                           offsets.numel() - 1, F_, _ptr(R, _f32), D, R.stride(0),
                           None if pos is None else _ptr(pos, _i64),
                           None if pos is None else _ptr(extra, _f32),
                           None if minus is None else _ptr(u, _f32),
                           None if minus is None else _ptr(c, _f32), _ptr(W.detach(), _f32),
                           _ptr(m, _f32), _ptr(v, _f32), beta1, beta2, 1 - beta1, 1 - beta2, eps,
                           step_size, bc2_sqrt,
                           int(project), int(unit), None if out is None else _ptr(out, _f32),
                           _threads()) != 0:
        raise MemoryError("sparse_adam: out of memory for the feature-sorted entries")
    torch.autograd.graph.increment_version(W)
    return out


def _rows_ok(*tensors: Tensor) -> bool:
    return all(t.is_contiguous() and t.ndim == 2 for t in tensors) and usable_for(*tensors)


def project_rows(W: Tensor, G: Tensor) -> bool:
    """In place, G[f] -= (<G[f], W[f]> / |W[f]|^2) W[f] for every row (zero rows left alone), one
    pass over both. Returns False (nothing done) when the kernels cannot take them."""
    if not _rows_ok(W, G) or W.shape != G.shape:
        return False
    _load().project_rows(_ptr(W.detach(), _f32), _ptr(G, _f32), W.shape[0], W.shape[1], _threads())
    return True


def unit_rows(W: Tensor) -> bool:
    """In place, every row of non-zero norm divided by its norm, one pass. Returns False (nothing
    done) when the kernels cannot take W."""
    if not _rows_ok(W):
        return False
    _load().unit_rows(_ptr(W.detach(), _f32), W.shape[0], W.shape[1], _threads())
    torch.autograd.graph.increment_version(W)  # written behind autograd's back: say so
    return True
