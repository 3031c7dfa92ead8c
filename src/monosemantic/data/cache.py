"""On-disk activation cache: sharded `.npy` arrays read by memory map, with a JSON manifest.

Layout of a cache folder:
  manifest.json                   the request (model, corpus, split, hookpoints, ...), the widths,
                                  and the list of finished shards with their token counts
  shard-00000.tokens.npy          [N] int32 token ids of the kept positions
  shard-00000.coords.npy          [N, 2] int64 (context index, position)
  shard-00000.<hookpoint>.npy     [N, D] activations (float32 or float16)

Shard i always covers contexts [i*C, (i+1)*C) (C = contexts_per_shard), computed in the same
forward batches, so a run killed at any moment and resumed ends with the same bytes as one that
never stopped: every file is written atomically (temporary file, then rename), and the manifest
names a shard only after all its files exist. A folder whose manifest asks for something else
is refused, never silently reused. Temporary files left by a kill mid-write are removed on resume.

Debugging aid: the environment variable `MONOSEMANTIC_DEBUG_SHARD_SLEEP` (seconds, default 0)
makes `build_cache` sleep after writing each shard, so a test can kill a run between shards
deterministically. Never needed in normal use.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..utils import atomic_write, atomic_write_json, cache_dir, cpu_has_bf16_units, read_json
from .activations import ActivationChunk, harvest

log = logging.getLogger(__name__)

FORMAT = "monosemantic.activations/1"
DTYPES = {"float32": np.float32, "float16": np.float16}
FORWARD_DTYPES = ("float32", "bfloat16")
DEBUG_SLEEP_ENV = "MONOSEMANTIC_DEBUG_SHARD_SLEEP"


@dataclass(frozen=True)
class CacheRequest:
    """Everything that decides a cache's bytes; two caches match when these are equal."""

    model: str
    corpus: str
    split: str
    hookpoints: tuple[str, ...]
    n_tokens: int
    ctx_len: int = 256
    batch_size: int = 8
    contexts_per_shard: int = 64
    dtype: str = "float32"
    eval_fraction: float = 0.05
    exclude_ids: tuple[int, ...] = ()
    forward_dtype: str = "float32"
    """The model's matmuls: float32, or bfloat16 under torch.autocast (activations.harvest_batch)."""

    def __post_init__(self):
        if self.n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {self.n_tokens}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {list(FORWARD_DTYPES)}, "
                             f"got {self.forward_dtype!r}")
        if self.contexts_per_shard % self.batch_size:
            raise ValueError(f"contexts_per_shard ({self.contexts_per_shard}) must be a multiple "
                             f"of batch_size ({self.batch_size})")
        if not self.hookpoints:
            raise ValueError("at least one hookpoint is needed")

    def to_json(self) -> dict:
        d = asdict(self)
        d["hookpoints"], d["exclude_ids"] = list(self.hookpoints), list(self.exclude_ids)
        if d["forward_dtype"] == "float32":  # caches made before the field keep their names
            del d["forward_dtype"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CacheRequest":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["hookpoints"], kw["exclude_ids"] = tuple(kw["hookpoints"]), tuple(kw["exclude_ids"])
        return cls(**kw)

    def default_folder(self) -> Path:
        import hashlib, json

        digest = hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:10]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.model}-{Path(self.corpus).name}")
        return cache_dir() / "activations" / f"{stem}-{self.split}-{digest}"


def _safe(hookpoint: str) -> str:
    return hookpoint.replace(":", "@")


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False), "wb")


class ActivationCache:
    """A finished (or partial) cache folder, read through memory maps without copies."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.folder} is not an activation cache (no manifest.json); "
                                    "make one with `monosemantic cache`")
        self.manifest = read_json(path)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown format {self.manifest.get('format')!r} "
                             f"(expected {FORMAT!r})")
        self.request = CacheRequest.from_json(self.manifest["request"])
        self.widths: dict[str, int] = self.manifest["widths"]
        counts = [s["n_tokens"] for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def hookpoints(self) -> list[str]:
        return list(self.request.hookpoints)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard_array(self, shard: int, name: str) -> np.ndarray:
        """Memory-mapped array `name` ("tokens", "coords" or a hookpoint) of one shard."""
        key = (shard, name)
        if key not in self._maps:
            stem = name if name in ("tokens", "coords") else _safe(name)
            path = self.folder / f"shard-{shard:05d}.{stem}.npy"
            try:
                self._maps[key] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"cache shard {path} is missing or corrupt ({err}); delete the "
                                 "cache folder and run `monosemantic cache` again") from err
        return self._maps[key]

    def tokens(self) -> np.ndarray:
        return np.concatenate([self.shard_array(i, "tokens") for i in range(len(self.offsets) - 1)])

    def read(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of `name` across shards, as a float32 (or int) tensor."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) are outside the cache's {len(self)} rows")
        if start == stop:
            return _to_tensor(self.shard_array(0, name)[:0])
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < stop:
            lo, hi = self.offsets[i], self.offsets[i + 1]
            take = min(stop, hi) - start
            parts.append(self.shard_array(i, name)[start - lo:start - lo + take])
            start += take
            i += 1
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return _to_tensor(arr)

    def gather(self, name: str, index: np.ndarray) -> Tensor:
        """Rows at global positions `index` (any order) of `name`, as a tensor."""
        index = np.asarray(index, dtype=np.int64)
        first = self.shard_array(0, name)
        out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
        if len(index) and bool((np.diff(index) >= 0).all()):
            # sorted (as `batches` asks): each shard's rows are one slice of the output, and
            # np.take writes them there straight from the memory map, one copy in all
            cuts = np.searchsorted(index, self.offsets)
            for s in range(len(self.offsets) - 1):
                a, b = int(cuts[s]), int(cuts[s + 1])
                if a < b:
                    np.take(self.shard_array(s, name), index[a:b] - self.offsets[s], axis=0, out=out[a:b])
            return _to_tensor(out)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self.shard_array(int(s), name)[index[sel] - self.offsets[s]]
        return _to_tensor(out)

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0,
                hookpoints: list[str] | None = None, shuffle: bool = True, rank: int = 0,
                world_size: int = 1) -> Iterator[dict[str, Tensor]]:
        """Endless batches over the cache, epoch after epoch, each epoch a fresh permutation.

        Batch `s` depends only on (seed, s), so a resumed run starting at `start_step` sees
        exactly the batches an uninterrupted one would. With `world_size` > 1, yield only rows
        [batch_size * rank // world_size, batch_size * (rank + 1) // world_size) of each batch:
        the ranks of a distributed run read disjoint parts whose concatenation in rank order is
        the batch one process reads.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        lo, hi = batch_size * rank // world_size, batch_size * (rank + 1) // world_size
        hookpoints = hookpoints or self.hookpoints
        n = len(self)
        if n < batch_size:
            raise ValueError(f"the cache holds {n} tokens, fewer than one batch of {batch_size}")
        per_epoch = n // batch_size
        step = start_step
        while True:
            epoch, offset = divmod(step, per_epoch)
            if shuffle:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
            for j in range(offset, per_epoch):
                if shuffle:
                    idx = np.sort(perm[j * batch_size:(j + 1) * batch_size])[lo:hi]
                    yield {h: self.gather(h, idx) for h in hookpoints}
                else:
                    yield {h: self.read(h, j * batch_size + lo, j * batch_size + hi) for h in hookpoints}
                step += 1


def _to_tensor(arr: np.ndarray) -> Tensor:
    if not arr.flags.writeable:  # a memmap slice: torch needs a writable buffer
        arr = np.array(arr)
    t = torch.from_numpy(arr)
    return t.float() if t.is_floating_point() else t


def _check_match(folder: Path, request: CacheRequest) -> dict | None:
    path = folder / "manifest.json"
    if not path.exists():
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"{folder} exists and is not an activation cache; choose another "
                             "output folder")
        return None
    manifest = read_json(path)
    theirs = {"forward_dtype": "float32", **manifest.get("request", {})}  # older manifests lack it
    ours = {**request.to_json(), "forward_dtype": request.forward_dtype}
    diff = [f"{k}: cached {theirs.get(k)!r}, asked {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ValueError(f"the activation cache in {folder} was made for a different request "
                         f"({'; '.join(diff)}). Use another --out folder, or delete this one.")
    return manifest


def build_cache(lm, documents: list[str], request: CacheRequest, folder: str | Path | None = None,
                progress: bool = True) -> ActivationCache:
    """Fill (or finish) the cache for `request` in `folder`; return it once complete."""
    from tqdm.auto import tqdm

    from ..hooks import hookpoint_widths

    folder = Path(folder) if folder is not None else request.default_folder()
    manifest = _check_match(folder, request)
    if manifest is not None and manifest["complete"]:
        return ActivationCache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a run killed inside an atomic write
        stale.unlink()
    hookpoints = list(request.hookpoints)
    if manifest is None:
        manifest = {"format": FORMAT, "request": request.to_json(), "complete": False,
                    "widths": hookpoint_widths(lm.model, hookpoints), "shards": []}
        atomic_write_json(folder / "manifest.json", manifest)
    done = sum(s["n_tokens"] for s in manifest["shards"])
    first_shard = len(manifest["shards"])
    cps = request.contexts_per_shard
    device = next(lm.model.parameters()).device
    if request.forward_dtype == "bfloat16" and device.type == "cpu" and cpu_has_bf16_units() is False:
        log.warning("forward_dtype=bfloat16 on a CPU without AMX-BF16 or AVX512-BF16: its bf16 "
                    "matmuls run in software, much slower than fp32; --forward-dtype float32 is "
                    "the fast choice here")
    chunks = harvest(lm.model, lm.tokenizer, documents, hookpoints, request.ctx_len,
                     lm.bos_token_id, request.batch_size, list(request.exclude_ids),
                     skip_contexts=first_shard * cps, forward_dtype=request.forward_dtype)
    if done >= request.n_tokens:  # killed after the last shard, before `complete` was written
        chunks = iter(())
    bar = tqdm(total=request.n_tokens, initial=done, unit="tok", unit_scale=True,
               desc="caching activations", disable=not progress, dynamic_ncols=True)
    dtype = DTYPES[request.dtype]
    shard, pending = first_shard, []
    for chunk in chunks:
        pending.append(chunk)
        bar.update(min(len(chunk), max(0, bar.total - bar.n)))
        if len(pending) * request.batch_size < cps and sum(map(len, pending)) < request.n_tokens - done:
            continue
        done += _write_shard(folder, manifest, shard, pending, request.n_tokens - done, dtype)
        shard, pending = shard + 1, []
        if os.environ.get(DEBUG_SLEEP_ENV):
            time.sleep(float(os.environ[DEBUG_SLEEP_ENV]))
        if done >= request.n_tokens:
            break
    if pending and done < request.n_tokens:
        done += _write_shard(folder, manifest, shard, pending, request.n_tokens - done, dtype)
    bar.close()
    if done < request.n_tokens:
        log.warning("corpus %s (%s) ran out after %d of %d requested tokens",
                    request.corpus, request.split, done, request.n_tokens)
    manifest["complete"] = True
    manifest["n_tokens_written"] = done
    atomic_write_json(folder / "manifest.json", manifest)
    return ActivationCache(folder)


def _write_shard(folder: Path, manifest: dict, shard: int, chunks: list[ActivationChunk],
                 budget: int, dtype) -> int:
    n = min(sum(map(len, chunks)), budget)
    prefix = folder / f"shard-{shard:05d}"
    _save_npy(Path(f"{prefix}.tokens.npy"),
              torch.cat([c.tokens for c in chunks])[:n].numpy().astype(np.int32))
    _save_npy(Path(f"{prefix}.coords.npy"), torch.cat([c.coords for c in chunks])[:n].numpy())
    for h in chunks[0].acts:
        acts = torch.cat([c.acts[h] for c in chunks])[:n].numpy().astype(dtype, copy=False)
        if not np.isfinite(acts).all():
            bad = np.argwhere(~np.isfinite(acts))[0]
            raise ValueError(f"hookpoint {h} produced a non-finite activation in shard {shard} "
                             f"(row {bad[0]}, dim {bad[1]}); with dtype float16 use float32")
        _save_npy(Path(f"{prefix}.{_safe(h)}.npy"), acts)
    manifest["shards"].append({"index": shard, "n_tokens": n})
    atomic_write_json(folder / "manifest.json", manifest)
    return n


def list_caches(root: Path | None = None) -> list[ActivationCache]:
    root = root or cache_dir() / "activations"
    if not root.exists():
        return []
    out = []
    for path in sorted(root.glob("*/manifest.json")):
        try:
            out.append(ActivationCache(path.parent))
        except (ValueError, KeyError, OSError):
            log.warning("skipping unreadable cache %s", path.parent)
    return out
