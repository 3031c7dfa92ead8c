"""Small shared helpers: the cache folder, atomic writes, JSON files, seeding.

Every write that matters goes through `atomic_write_*`: the bytes land in a temporary file in the
same folder and are renamed over the target, so a kill at any moment leaves either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CACHE_ENV = "MONOSEMANTIC_CACHE"


def cache_dir() -> Path:
    """The folder where models, corpora and activation caches live (`$MONOSEMANTIC_CACHE` or
    `~/.cache/monosemantic`)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "monosemantic")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of `tensors` (made contiguous), atomically, written straight from each
    tensor's memory: `safetensors.torch.save` builds the whole file in memory first, a copy of
    every tensor (127 MB for a checkpoint of the [O1.3] SAE with its Adam state) at the moment a
    training run's memory is highest. The layout is the format's (an 8-byte little-endian header
    length, the JSON header padded with spaces to 8 bytes, the tensors' bytes back to back in
    name order); safetensors reads it (tests/unit/test_utils.py)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if sys.byteorder != "little" or any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()):
        from safetensors.torch import save

        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    start = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [start, start + size]}
        start += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f) -> None:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in sorted(tensors):
            t = tensors[name]
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    atomic_write(path, write, "wb")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 "flags", Arm "Features"), else
    `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def cpu_has_bf16_units() -> bool | None:
    """Whether the CPU multiplies bf16 in hardware (x86: AMX-BF16 or AVX512-BF16; Arm: BF16),
    from its flags; None where no flags can be read."""
    flags = cpu_flags()
    if not flags.startswith(("flags", "Features")):
        return None
    names = set(flags.split(":", 1)[-1].split())
    return bool(names & {"amx_bf16", "avx512_bf16", "bf16"})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



class prefetch:
    """Iterate `source` in a background thread, reading at most `depth` items ahead.

    Reading and gathering a batch (numpy / torch calls that release the GIL) then overlaps the
    training step. At most `depth` items exist beyond the one the consumer holds (queued, or
    being read): the thread starts reading the next item only once one is taken. An exception in
    the source is re-raised by `next`. The thread stops when the source ends, on `close()`, or
    once this object is garbage-collected (a loop left by an exception). The order of items is
    the source's."""

    def __init__(self, source, depth: int = 2):
        import queue
        import threading

        self._stop = threading.Event()  # first: __del__ reads it even when __init__ raises
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(depth)
        # the thread holds the queue, slots and event, not self, so self can be collected
        self._thread = threading.Thread(target=_prefetch_worker, daemon=True, name="monosemantic-prefetch",
                                        args=(iter(source), self._queue, self._slots, self._stop))
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        item, err, done = self._queue.get()
        if err is not None:
            raise err
        if done:
            raise StopIteration
        self._slots.release()
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self) -> None:
        self._stop.set()


def _prefetch_worker(it, q, slots, stop) -> None:
    def slot() -> bool:  # wait until the consumer has taken an item (or we are stopped)
        while not stop.is_set():
            if slots.acquire(timeout=0.1):
                return True
        return False

    try:
        while slot():
            try:
                item = next(it)
            except StopIteration:
                q.put((None, None, True))
                return
            q.put((item, None, False))
    except BaseException as err:  # handed to the consumer
        q.put((None, err, True))


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim`). The allocator keeps
    freed blocks for reuse, so the large temporaries of a one-off phase (a coder's initialisation
    on its first batch) would otherwise stay resident, uncounted by any tensor, for the whole run.
    A no-op where the C library has no malloc_trim."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc(name: str):
    """glibc's function `name` through ctypes, or None without glibc (macOS, musl, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS: large
    blocks (up to 1 GiB) come from the heap rather than fresh mmaps, the heap's top is not
    trimmed, and it grows 64 MiB at a time. A model forward pass or a training step frees and
    re-allocates the same large tensors every batch; by default each one's pages are returned and
    then faulted in (and zeroed) again, about 3 million page faults and 4 s of system time for a
    127k-token harvest plus training here. The cost is that the process's resident memory stays at
    its peak. The command-line tool calls this at start (set any of MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ to keep glibc's own policy); the library does not.
    Returns False where there is no glibc (or the user chose a policy)."""
    mallopt = _glibc("mallopt")
    if mallopt is None or any(name in os.environ for name in MALLOC_ENV):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # M_MMAP_THRESHOLD (-3), M_TRIM_THRESHOLD (-1), M_TOP_PAD (-2)
    return all(mallopt(opt, value) == 1 for opt, value in ((-3, 1 << 30), (-1, 2**31 - 1), (-2, 64 << 20)))
