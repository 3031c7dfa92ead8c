"""The on-disk activation cache: exact round trip, deterministic batches, reads across shards,
resumption after a real SIGKILL, and refusal of folders that do not match.

Shapes: T = 16 context length, D = 32 model width (64 at the MLP down-projection input).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monosemantic.data import ActivationCache, CacheRequest, build_cache, harvest
from monosemantic.data.cache import DEBUG_SLEEP_ENV
from monosemantic.utils import read_json

HOOKPOINTS = ("model.layers.1", "model.layers.2.mlp.down_proj:input")


def request(**kw) -> CacheRequest:
    base = dict(model="tiny-llama-0", corpus="docs", split="train", hookpoints=HOOKPOINTS,
                n_tokens=500, ctx_len=16, batch_size=2, contexts_per_shard=4,
                exclude_ids=(0, 1, 2, 3))
    return CacheRequest(**{**base, **kw})


@pytest.fixture
def cache(llama, documents, tmp_path) -> ActivationCache:
    return build_cache(llama, documents, request(), tmp_path / "cache", progress=False)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_is_exact(llama, documents, cache):
    chunks = list(harvest(llama.model, llama.tokenizer, documents, list(HOOKPOINTS), 16, 0, 2,
                          [0, 1, 2, 3]))
    assert cache.complete and len(cache) == 500 and len(cache.offsets) - 1 > 3
    assert cache.widths == {HOOKPOINTS[0]: 32, HOOKPOINTS[1]: 64}
    for h in HOOKPOINTS:
        fresh = torch.cat([c.acts[h] for c in chunks])[:500]
        assert torch.equal(cache.read(h, 0, 500), fresh)  # bit for bit
    assert np.array_equal(cache.tokens(), torch.cat([c.tokens for c in chunks])[:500].numpy())
    assert torch.equal(cache.read("coords", 0, 500), torch.cat([c.coords for c in chunks])[:500])
    # every shard but the last holds exactly contexts_per_shard contexts
    ctx = cache.read("coords", 0, 500)[:, 0]
    for i in range(len(cache.offsets) - 2):
        lo, hi = cache.offsets[i], cache.offsets[i + 1]
        assert set(ctx[lo:hi].tolist()) == set(range(4 * i, 4 * i + 4))


def test_read_and_gather_across_shard_boundaries(cache):
    h = HOOKPOINTS[0]
    whole = cache.read(h, 0, len(cache))
    b = int(cache.offsets[1])
    assert torch.equal(cache.read(h, b - 3, b + 200), whole[b - 3:b + 200])
    assert cache.read(h, b, b).shape == (0, 32)
    with pytest.raises(IndexError, match="outside the cache's 500 rows"):
        cache.read(h, 490, 501)
    index = np.array([499, 0, b, b - 1, 250, 3, 250])
    assert torch.equal(cache.gather(h, index), whole[index])
    assert torch.equal(cache.gather("tokens", index), torch.from_numpy(cache.tokens()[index]))
    ordered = np.sort(np.concatenate([index, [b, b + 1, 498]]))  # the one-copy path for sorted rows
    assert torch.equal(cache.gather(h, ordered), whole[ordered])
    assert cache.gather(h, ordered[:0]).shape == (0, 32)


def test_batches_are_deterministic_and_resumable(cache):
    def take(n, **kw):
        it = cache.batches(64, **kw)
        return [next(it) for _ in range(n)]

    first = take(12, seed=3)  # 7 batches per epoch: crosses into the second epoch
    again = take(12, seed=3)
    resumed = take(4, seed=3, start_step=8)
    other = take(1, seed=4)
    for a, b in zip(first, again):
        assert all(torch.equal(a[h], b[h]) for h in HOOKPOINTS)
    for a, b in zip(first[8:], resumed):
        assert all(torch.equal(a[h], b[h]) for h in HOOKPOINTS)
    assert not torch.equal(first[0][HOOKPOINTS[0]], other[0][HOOKPOINTS[0]])
    # one epoch serves distinct rows, the hookpoints of a row together ("coords" locates a row)
    it = cache.batches(64, seed=3, hookpoints=[*HOOKPOINTS, "coords"])
    epoch = [next(it) for _ in range(7)]
    assert all(torch.equal(a[h], b[h]) for a, b in zip(epoch, first[:7]) for h in HOOKPOINTS)
    coords = torch.cat([b["coords"] for b in epoch])
    all_coords = cache.read("coords", 0, len(cache))
    index = (coords[:, None, :] == all_coords[None]).all(-1).int().argmax(1)
    assert index.unique().numel() == 7 * 64
    for h in HOOKPOINTS:
        assert torch.equal(torch.cat([b[h] for b in epoch]), cache.gather(h, index.numpy()))
    plain = next(cache.batches(64, shuffle=False, hookpoints=[HOOKPOINTS[1]]))
    assert list(plain) == [HOOKPOINTS[1]]
    assert torch.equal(plain[HOOKPOINTS[1]], cache.read(HOOKPOINTS[1], 0, 64))


def test_resume_after_the_last_shard_adds_nothing(llama, documents, cache):
    """Killed after the last shard was named in the manifest but before it was marked complete."""
    expected = folder_bytes(cache.folder)
    manifest = read_json(cache.folder / "manifest.json")
    manifest["complete"] = False
    del manifest["n_tokens_written"]
    (cache.folder / "manifest.json").write_text(json.dumps(manifest))
    (cache.folder / ".shard-00009.tokens.npy.abc.tmp").write_bytes(b"half")  # a killed write
    build_cache(llama, documents, request(), cache.folder, progress=False)
    assert folder_bytes(cache.folder) == expected


def test_mismatched_manifest_and_foreign_folder_are_refused(llama, documents, cache, tmp_path):
    with pytest.raises(ValueError, match=r"different request \(ctx_len: cached 16, asked 32\)"):
        build_cache(llama, documents, request(ctx_len=32), cache.folder, progress=False)
    with pytest.raises(ValueError, match=r"n_tokens: cached 500, asked 400"):
        build_cache(llama, documents, request(n_tokens=400), cache.folder, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an activation cache; choose another"):
        build_cache(llama, documents, request(), foreign, progress=False)
    with pytest.raises(FileNotFoundError, match="not an activation cache"):
        ActivationCache(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bfloat16_forward_is_close_recorded_and_kept_apart(llama, documents, cache, tmp_path):
    """forward_dtype="bfloat16" autocasts the harvest's matmuls: the activations stay fp32 and
    near the fp32 forward's, but differ (bf16 rounding), and the request names it so that the two
    caches never mix. A float32 request keeps the name it had before the field existed."""
    bf = build_cache(llama, documents, request(forward_dtype="bfloat16"), tmp_path / "bf16",
                     progress=False)
    assert bf.request.forward_dtype == "bfloat16" and len(bf) == len(cache)
    assert np.array_equal(bf.tokens(), cache.tokens())
    for h in HOOKPOINTS:
        exact, rounded = cache.read(h, 0, 500), bf.read(h, 0, 500)
        assert rounded.dtype == torch.float32
        rel = ((rounded - exact).norm() / exact.norm()).item()
        assert 1e-4 < rel < 0.02, (h, rel)
    assert request(forward_dtype="bfloat16").default_folder() != request().default_folder()
    assert "forward_dtype" not in request().to_json()
    assert request().default_folder().name.endswith("-train-f3bc47dfbc")  # pinned name
    with pytest.raises(ValueError, match=r"forward_dtype must be one of \['float32', 'bfloat16'\]"):
        request(forward_dtype="float16")
    for folder, asked, cached in ((cache.folder, "bfloat16", "float32"),
                                  (bf.folder, "float32", "bfloat16")):
        with pytest.raises(ValueError, match=rf"different request \(forward_dtype: cached "
                                             rf"'{cached}', asked '{asked}'\)"):
            build_cache(llama, documents, request(forward_dtype=asked), folder, progress=False)


@pytest.mark.parametrize("flags, units", [
    ("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n", True),
    ("flags\t\t: fpu sse avx2 fma\n", False),
    ("Features\t: fp asimd bf16 i8mm\n", True),
    ("x86_64", None)])  # no /proc/cpuinfo: platform.processor()
def test_bf16_forward_warns_on_a_cpu_without_bf16_units(llama, documents, tmp_path, caplog,
                                                        monkeypatch, flags, units):
    import monosemantic.utils as utils

    monkeypatch.setattr(utils, "cpu_flags", lambda: flags)
    assert utils.cpu_has_bf16_units() is units
    with caplog.at_level("WARNING", logger="monosemantic.data.cache"):
        build_cache(llama, documents, request(n_tokens=40, forward_dtype="bfloat16"),
                    tmp_path / "bf16", progress=False)
    assert ("much slower than fp32" in caplog.text) == (units is False)


def cache_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return ["cache", str(model), str(corpus), "--tokens", "3000", "--ctx-len", "32",
            "--batch-size", "4", "--contexts-per-shard", "16", "--hookpoints", "model.layers.1",
            "--out", str(out)]


def cli_cache(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # as torch.set_num_threads(1)
    return subprocess.Popen([sys.executable, "-m", "monosemantic", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_run_resumes_to_the_same_bytes(tiny_model_folder, text_file, tmp_path):
    """A real process, SIGKILLed between shards, then resumed by the same command, ends with the
    same files as an uninterrupted run (made in this process while the other one starts up)."""
    from monosemantic.cli import main

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    proc = cli_cache(cache_args(tiny_model_folder, text_file, killed), {DEBUG_SLEEP_ENV: "60"})
    assert main(cache_args(tiny_model_folder, text_file, clean)) == 0
    manifest = killed / "manifest.json"
    deadline = time.monotonic() + 60
    while not (manifest.exists() and read_json(manifest)["shards"]):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no shard appeared within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_json(manifest)
    assert not partial["complete"] and len(partial["shards"]) == 1
    resumed = cli_cache(cache_args(tiny_model_folder, text_file, killed))
    assert resumed.wait() == 0, resumed.communicate()[1].decode()[-2000:]
    expected = folder_bytes(clean)
    assert len([n for n in expected if n.endswith(".tokens.npy")]) >= 3
    assert read_json(clean / "manifest.json")["n_tokens_written"] == 3000
    assert folder_bytes(killed) == expected
