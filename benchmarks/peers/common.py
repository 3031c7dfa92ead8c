"""What every training worker shares: arguments, the batches, the timed loop, the JSON result.

A worker is run as `PYTHON worker_<impl>.py '<json args>'` with the python of its own environment
(the peers' from benchmarks/peers/envs.py, ours from the repo's venv), so this file needs only the
standard library, numpy and torch; it never imports monosemantic.

Batches: the activation cache is read directly (manifest.json + shard-NNNNN.<hookpoint>.npy, the
layout of monosemantic.data.cache). Epoch e is the permutation numpy.random.default_rng(seed + e)
of all rows; batch j takes rows [j*B, (j+1)*B) of it, sorted, read through a memory map whose
pages are released after each batch (MADV_DONTNEED), so the cache never counts in a worker's peak
RSS. Every implementation sees the same batches in the same order. A batch is read before the
clock of its step starts.

Args (JSON): cache, hookpoint, batch_size, n_features, k, steps (timed or trained), warmup
(untimed steps first), seed, threads, lr (null = the implementation's recommended LR),
warmup_frac (cap of an LR warm-up given in steps), mode ("time" or "train"), out (folder for the
trained coder in the implementation's own layout, "train" mode).
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch


def args() -> dict:
    a = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(int(a.get("threads") or os.cpu_count() or 1))
    torch.manual_seed(int(a.get("seed", 0)))
    return a


READ_ROWS = 256
"""Rows read between two releases of the mapped pages (Batches.read)."""


class Batches:
    """Endless float32 batches [B, D] of one hookpoint of a monosemantic activation cache."""

    def __init__(self, cache: str, hookpoint: str, batch_size: int, seed: int = 0):
        folder = Path(cache)
        manifest = json.loads((folder / "manifest.json").read_text())
        stem = hookpoint.replace(":", "@")  # monosemantic.data.cache._safe
        self.maps, self.arrays, self.headers, counts = [], [], [], []
        for s in manifest["shards"]:
            path = folder / f"shard-{s['index']:05d}.{stem}.npy"
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                assert not fortran, path
                header = f.tell()
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.maps.append(mm)
            self.headers.append(header)
            self.arrays.append(np.frombuffer(mm, dtype=dtype, offset=header).reshape(shape))
            counts.append(shape[0])
        self.width = self.arrays[0].shape[1]
        self.row_bytes = self.width * self.arrays[0].dtype.itemsize
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n, self.batch_size, self.seed = int(self.offsets[-1]), batch_size, seed
        self.per_epoch = self.n // batch_size

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted global indices) as a new float32 array; the pages read are dropped from
        this process (MADV_DONTNEED) every READ_ROWS rows, so the cache never counts in its peak
        RSS (a batch's rows touch about 32 MB of mapped pages: dropped only at the end, they
        counted in the peak of any implementation that reads its next batch during a step)."""
        out = np.empty((len(rows), self.width), dtype=np.float32)
        # rows are sorted, so each shard's rows are one slice of out: np.take writes them there
        # straight from the memory map, with no gathered temporary (as monosemantic's cache does)
        cuts = np.searchsorted(rows, self.offsets)
        page = mmap.PAGESIZE
        for s in range(len(self.arrays)):
            arr, mm, base = self.arrays[s], self.maps[s], self.headers[s]
            for a in range(int(cuts[s]), int(cuts[s + 1]), READ_ROWS):
                b = min(a + READ_ROWS, int(cuts[s + 1]))
                local = rows[a:b] - self.offsets[s]
                np.take(arr, local, axis=0, out=out[a:b])
                start = (base + int(local[0]) * self.row_bytes) // page * page
                end = base + (int(local[-1]) + 1) * self.row_bytes
                mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), end) - start)
        return out

    def __iter__(self) -> Iterator["torch.Tensor"]:
        import torch

        step = 0
        while True:
            epoch, j = divmod(step, self.per_epoch)
            if j == 0:
                perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            rows = np.sort(perm[j * self.batch_size:(j + 1) * self.batch_size])
            yield torch.from_numpy(self.read(rows))
            step += 1


def timed_loop(step: Callable[[int, "torch.Tensor"], None], batches: Iterator, warmup: int,
               steps: int) -> list[float]:
    """Run warmup + steps steps; the seconds of each step after the warm-up."""
    times = []
    for i in range(warmup + steps):
        x = next(batches)
        t0 = time.perf_counter()
        step(i, x)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


_BASELINE: list[float] = []


def warm_imports() -> None:
    """Step a one-element Adam (fused and foreach): torch.optim imports its compile machinery on
    first use, 66 MB of modules with torch 2.13 on this machine, which every implementation pays
    once and which is not memory that training holds."""
    import torch

    for fused in (True, False):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=1e-3, fused=fused)
        p.grad = torch.ones(1)
        opt.step()


def mark_baseline() -> None:
    """Record the RSS after imports and data set-up, before the coder and optimizer exist: the
    result then also carries train_rss_mb = peak - baseline, the memory training itself took
    (imports alone are 250-700 MB and differ between implementations; torch.optim's lazy imports
    are taken first, see warm_imports)."""
    warm_imports()
    _BASELINE[:] = [current_rss_mb()]


def emit(result: dict) -> None:
    """The worker's one result line (the orchestrator reads the last line starting RESULT)."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    if _BASELINE:
        result.setdefault("train_rss_mb", result["peak_rss_mb"] - _BASELINE[0])
    print("RESULT " + json.dumps(result), flush=True)


def warmup_steps(default: int, total: int, frac: float) -> int:
    """A peer's LR warm-up in steps, capped at frac x the run (its defaults assume long runs)."""
    return max(0, min(default, int(frac * total)))


def save_reference(folder: str, x: "torch.Tensor", out: "torch.Tensor") -> None:
    """x [N, D] and the implementation's own output for it [N, D], beside the trained coder, so
    that the coder as loaded by monosemantic can be checked against the peer's own forward."""
    from safetensors.torch import save_file

    save_file({"x": x.contiguous(), "out": out.detach().contiguous()},
              str(Path(folder) / "reference.safetensors"))


def reference_rows(batches: Batches, n: int = 512) -> "torch.Tensor":
    import torch

    return torch.from_numpy(batches.read(np.arange(min(n, batches.n))))
