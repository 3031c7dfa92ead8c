"""Distributed training on 2 gloo processes (train/distributed.py), against one process.

Each multi-process test spawns two ranks (torch.multiprocessing, spawn) that join a gloo group
with a short timeout, and compares what they write with a one-process run made in the test:
  - data-parallel, B/2 rows per rank, equals one process with B rows after 5 steps (float
    tolerance), with outlier tokens only in rank 0's rows so the ranks keep unequal counts, for
    topk, relu, jumprelu (with resampling) and batchtopk (selection over both ranks' rows);
  - the end-to-end losses (e2e+ds, and local then KL fine-tune) on 2 ranks, data and layers mode,
    equal one process: three coders on the tiny Llama, one a transcoder reading what another wrote;
  - layer-distributed, 4 coders of unequal widths on 2 ranks, each rank running the tiny Llama on
    its own contexts, equals one process bit for bit; a checkpoint the 2 ranks wrote (with a part
    file) resumes on 1 process, and one that 1 process wrote resumes on 2, to the same bits;
  - a rank killed (or stalled) mid-run makes the other raise DistributedError within the timeout
    instead of hanging, and the run resumes on 1 process;
  - the README's torchrun command on the tiny model equals the one-process command.

Shapes: D = 16 toy width; the tiny Llama's hookpoints are 32 wide (64 at the MLP down-projection
input); B rows per global batch.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import make_lm, sample_documents
from monosemantic.coders import load_coder
from monosemantic.data import CacheRequest, build_cache
from monosemantic.data.tokens import iter_contexts
from monosemantic.data.tokens import special_token_ids
from monosemantic.hooks import hookpoint_widths, run_to_hookpoints
from monosemantic.toy import ToyConfig, ToyData
from monosemantic.train import CoderSpec, TrainConfig, Trainer
from monosemantic.train.e2e import LossConfig, SplicedObjective, token_batches
from monosemantic.train.distributed import (DistConfig, Parallel, assign_owners, shard_batches,
                                            shard_rows)
from monosemantic.train.toy_run import HOOKPOINT, toy_batches
from monosemantic.utils import CACHE_ENV, read_json

TOY = ToyConfig(d=16, n_features=32, mean_active=2, seed=1)
B = 256


# ---- launching ranks ----------------------------------------------------------------------------

def _entry(rank: int, world: int, port: int, timeout: float, fn, args, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        out = {"ok": True, **(fn(rank, world, *args) or {})}
    except Exception as err:  # reported to the test, which asserts on it
        out = {"ok": False, "error": type(err).__name__, "message": str(err)}
    Path(result).write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, folder: Path, *args, world: int = 2, timeout: float = 30.0, wait: float = 180.0,
           grace: float = 5.0) -> tuple[list[dict], list[int]]:
    """Run fn(rank, world, *args) on `world` spawned gloo ranks; return each rank's result (what
    fn returned, or the exception it raised) and the ranks still running `grace` seconds after
    the others ended (or after `wait`), which are then killed."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    paths = [folder / f"rank{r}.json" for r in range(world)]
    procs = [ctx.Process(target=_entry, args=(r, world, port, timeout, fn, args, str(paths[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline, first_end = time.monotonic() + wait, None
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        if first_end is None and not all(p.is_alive() for p in procs):
            first_end = time.monotonic()
        if first_end is not None and time.monotonic() > first_end + grace:
            break
        time.sleep(0.1)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    results = [json.loads(path.read_text()) if path.exists()
               else {"ok": False, "exitcode": p.exitcode} for path, p in zip(paths, procs)]
    return results, hung


# ---- sources -------------------------------------------------------------------------------------

def _toy_source():
    """Toy batches of B rows; from step 1 on, rows 3, 7 and 11 (rank 0's half) are outliers."""
    plain = toy_batches(ToyData(TOY), B, seed=0)

    def from_step(start):
        for s, b in enumerate(plain(start), start):
            x = b[HOOKPOINT].clone()
            if s > 0:
                x[[3, 7, 11]] = 100.0
            yield {HOOKPOINT: x}
    return from_step


class _Dying(Parallel):
    """Rank `victim` dies (SIGKILL) or stalls (sleeps) as training step `at` begins."""

    victim, at, how = 1, 12, "kill"

    def exchange(self, batch, step, to_owners=True):
        if self.rank == self.victim and step == self.at:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # stall: alive but silent
        return super().exchange(batch, step, to_owners)


def _cfg(**kw) -> TrainConfig:
    base = dict(tokens=5 * B, batch_size=B, n_features=48, lr=3e-3, checkpoint_every=100, log_every=1,
                drop_outliers=True)  # unequal row counts per rank
    return TrainConfig(**{**base, **kw})


DDP = {"topk": dict(k=3), "relu": dict(activation="relu", coef=0.3),
       # thresholds above most pre-activations: features die and are resampled at step 2 (step 4
       # is in the LR decay, when nothing is resampled)
       "jumprelu": dict(activation="jumprelu", coef=0.01, resample_every=2, jumprelu_init_threshold=4.0),
       "batchtopk": dict(activation="batchtopk", k=3),
       # the loss over the global batch's variance, from each rank's sums
       "topk_fvu": dict(k=3, recon_loss="fvu")}


# ---- pure functions ------------------------------------------------------------------------------

def test_rows_split_contiguously_and_owners_balance():
    for n, world in [(10, 3), (256, 2), (5, 4)]:
        parts = [shard_rows(n, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    # unequal coders: the big one alone, the three small ones together
    assert assign_owners([4096, 6144, 4096, 16384], 2) == [1, 1, 1, 0]
    assert assign_owners([5, 5, 5], 2) == [0, 1, 0]
    assert assign_owners([7], 3) == [0]  # ranks 1 and 2 own nothing: allowed


def test_bad_distribute_option():
    with pytest.raises(ValueError, match="distribute='pipeline': use one of data, layers"):
        DistConfig(distribute="pipeline")


@pytest.mark.parametrize("shuffle", [True, False])
def test_cache_ranks_read_parts_that_concatenate_to_the_batch(llama, documents, tmp_path, shuffle):
    request = CacheRequest(model="tiny-llama-0", corpus="docs", split="train",
                           hookpoints=("model.layers.1",), n_tokens=500, ctx_len=16, batch_size=2,
                           contexts_per_shard=4)
    cache = build_cache(llama, documents, request, tmp_path / "cache", progress=False)
    for world in (2, 3):
        whole = cache.batches(100, seed=3, start_step=4, shuffle=shuffle)
        parts = [cache.batches(100, seed=3, start_step=4, shuffle=shuffle, rank=r, world_size=world)
                 for r in range(world)]
        for _ in range(6):  # crosses an epoch (5 batches of 100 in 500 rows)
            b = next(whole)["model.layers.1"]
            assert torch.equal(b, torch.cat([next(p)["model.layers.1"] for p in parts]))


# ---- data-parallel -------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, out: str) -> dict:
    for name, kw in DDP.items():
        trainer = Trainer([CoderSpec(name, HOOKPOINT, _cfg(**kw))], {HOOKPOINT: TOY.d}, Path(out) / name)
        coder = trainer.fit(shard_batches(_toy_source(), rank, world), progress=False)[name]
        state = {k: v.contiguous() for k, v in coder.state_dict().items()}
        save_file({**state, "since_fired": trainer.states[0].dead.since_fired},
                  f"{out}/{name}-rank{rank}.safetensors")
    return {}


def test_data_parallel_on_two_ranks_equals_one_process(tmp_path):
    results, hung = launch(_ddp_worker, tmp_path, str(tmp_path / "two"))
    assert not hung and all(r["ok"] for r in results), results
    for name, kw in DDP.items():
        ranks = [load_file(tmp_path / "two" / f"{name}-rank{r}.safetensors") for r in range(2)]
        for k in ranks[0]:  # every rank ends with the same state, to the bit
            assert torch.equal(ranks[0][k], ranks[1][k]), (name, k)
        trainer = Trainer([CoderSpec(name, HOOKPOINT, _cfg(**kw))], {HOOKPOINT: TOY.d},
                          tmp_path / "one" / name)
        one = trainer.fit(_toy_source(), progress=False)[name]
        dropped = [read_json(tmp_path / run / name / name / "training.json")["n_outliers"]
                   for run in ("two", "one")]  # "two": written by rank 0, counts of both ranks
        assert dropped == [12, 12]
        assert torch.equal(ranks[0]["since_fired"], trainer.states[0].dead.since_fired), name
        saved = load_coder(tmp_path / "two" / name / name)
        # BatchTopK selects over both ranks' rows; an entry at the batch threshold can flip with the
        # rounding of pre-activations computed in row blocks of 128 instead of 256 (seen: one
        # decoder entry off by 3.6e-5, every other within 1e-6)
        atol = 1e-4 if name == "batchtopk" else 1e-5
        for k, v in one.state_dict().items():
            torch.testing.assert_close(saved.state_dict()[k], v, rtol=1e-4, atol=atol, msg=f"{name} {k}")


# ---- layer-distributed ---------------------------------------------------------------------------

T, C = 16, 8  # context length, contexts per batch: B = 128 rows
LAYER_WIDTHS = {"model.layers.0": 32, "model.layers.1": 32, "model.layers.1.post_attention_layernorm": 32,
                "model.layers.1.mlp": 32, "model.layers.1.mlp.down_proj:input": 64}


class Interrupt(Exception):
    pass


def _layer_specs() -> list[CoderSpec]:
    base = dict(tokens=6 * C * T, batch_size=C * T, lr=3e-3, checkpoint_every=2, log_every=1)
    return [CoderSpec("l0-topk", "model.layers.0", TrainConfig(k=4, n_features=64, **base)),
            CoderSpec("l1-batchtopk", "model.layers.1",
                      TrainConfig(activation="batchtopk", k=4, n_features=96, **base)),
            CoderSpec("mlp-transcoder", "model.layers.1.post_attention_layernorm",
                      TrainConfig(kind="transcoder", k=4, n_features=64, **base), "model.layers.1.mlp"),
            CoderSpec("down-relu", "model.layers.1.mlp.down_proj:input",
                      TrainConfig(activation="relu", coef=0.3, resample_every=2, n_features=128, **base))]


def _lm_rows(rank: int, world: int, stop_at: int = -1):
    """Each rank runs the tiny Llama on its own contexts of each batch of C."""
    lm = make_lm("llama")
    contexts = np.stack(list(iter_contexts(lm.tokenizer, sample_documents(), T, 0)))
    lo, hi = shard_rows(C, rank, world)

    def from_step(start):
        for s in itertools.count(start):
            if s == stop_at:
                raise Interrupt
            ids = torch.from_numpy(contexts[[(s * C + i) % len(contexts) for i in range(lo, hi)]])
            acts = run_to_hookpoints(lm.model, ids, list(LAYER_WIDTHS))
            yield {h: a.reshape(-1, a.shape[-1]).float() for h, a in acts.items()}
    return from_step


def _layers_worker(rank: int, world: int, out: str) -> dict:
    specs, layers = _layer_specs(), DistConfig(distribute="layers")
    trainer = Trainer(specs, LAYER_WIDTHS, Path(out) / "whole", parallel=Parallel.current(layers))
    owned = sorted(trainer.fit(_lm_rows(rank, world), progress=False))
    par = trainer.parallel  # the way back (for the end-to-end loss): owners return the rows
    local = next(_lm_rows(rank, world)(0))
    full = par.exchange(local, 0)
    back = par.return_rows({s.name: full[s.hookpoint] for s in specs if par.owner[s.name] == rank},
                           par.owner, {s.name: LAYER_WIDTHS[s.hookpoint] for s in specs})
    round_trip = all(torch.equal(back[s.name], local[s.hookpoint]) for s in specs)
    try:
        Trainer(specs, LAYER_WIDTHS, Path(out) / "cut", parallel=Parallel.current(layers)).fit(
            _lm_rows(rank, world, stop_at=5), progress=False)
    except Interrupt:
        pass
    # a checkpoint one process wrote (the test made it before launching us), finished on two
    Trainer(specs, LAYER_WIDTHS, Path(out).parent / "from-one", parallel=Parallel.current(layers)).fit(
        _lm_rows(rank, world), progress=False)
    return {"owned": owned, "round_trip": round_trip}


def test_layers_on_two_ranks_equal_one_process_and_resume_across_world_sizes(tmp_path):
    specs = _layer_specs()
    with pytest.raises(Interrupt):  # one process stops at step 5, leaving the checkpoint of step 4
        Trainer(specs, LAYER_WIDTHS, tmp_path / "from-one").fit(_lm_rows(0, 1, stop_at=5), progress=False)
    results, hung = launch(_layers_worker, tmp_path, str(tmp_path / "two"))
    assert not hung and all(r["ok"] for r in results), results
    owned = [results[r]["owned"] for r in range(2)]
    assert sorted(owned[0] + owned[1]) == sorted(s.name for s in specs) and all(owned)
    assert all(r["round_trip"] for r in results)
    one = Trainer(specs, LAYER_WIDTHS, tmp_path / "one").fit(_lm_rows(0, 1), progress=False)
    for s in specs:
        two = load_coder(tmp_path / "two" / "whole" / s.name).state_dict()
        for k, v in one[s.name].state_dict().items():
            assert torch.equal(two[k], v), (s.name, k)
    cut = tmp_path / "two" / "cut"  # stopped at step 5: the checkpoint of step 4, with rank 1's part
    assert (cut / "checkpoint.safetensors").exists() and (cut / "checkpoint.part-r1-s4.safetensors").exists()
    resumed = Trainer(specs, LAYER_WIDTHS, cut).fit(_lm_rows(0, 1), progress=False)
    for s in specs:
        finished_on_two = load_coder(tmp_path / "from-one" / s.name).state_dict()
        for k, v in one[s.name].state_dict().items():
            assert torch.equal(resumed[s.name].state_dict()[k], v), (s.name, k)
            assert torch.equal(finished_on_two[k], v), (s.name, k)
    assert not list(cut.glob("checkpoint*")) and not list((tmp_path / "from-one").glob("checkpoint*"))


# ---- the end-to-end loss ------------------------------------------------------------------------

E2E_LOSSES = {"e2e+ds": LossConfig("e2e+ds"), "kl-finetune": LossConfig("local", kl_finetune_frac=0.5)}


def _e2e_specs() -> list[CoderSpec]:
    base = dict(tokens=6 * C * T, batch_size=C * T, lr=3e-3, checkpoint_every=100, log_every=1)
    return [CoderSpec("l0-topk", "model.layers.0", TrainConfig(k=4, n_features=64, **base)),
            # reads what l0-topk wrote: its input gradient goes back through the model to l0-topk
            CoderSpec("mlp-transcoder", "model.layers.1.post_attention_layernorm",
                      TrainConfig(kind="transcoder", activation="batchtopk", k=4, n_features=48, **base),
                      "model.layers.1.mlp"),
            CoderSpec("l2-relu", "model.layers.2", TrainConfig(activation="relu", coef=1e-3,
                                                               n_features=80, **base))]


def _e2e_run(rank: int, world: int, out: Path, loss: str, mode: str = "data") -> dict:
    lm = make_lm("llama")
    specs = _e2e_specs()
    widths = hookpoint_widths(lm.model, [h for s in specs for h in (s.hookpoint, s.out_hookpoint) if h])
    objective = SplicedObjective(lm.model, E2E_LOSSES[loss], specs, specs[0].config.tokens // specs[0].config.batch_size, special_token_ids(lm.tokenizer),
                                 contexts=C)
    batches = token_batches(lm.tokenizer, sample_documents(), T, lm.bos_token_id, C, 6 * C)
    trainer = Trainer(specs, widths, out, objective=objective,
                      parallel=Parallel.current(DistConfig(distribute=mode)))
    return trainer.fit(shard_batches(batches, rank, world) if world > 1 else batches, progress=False)


def _e2e_worker(rank: int, world: int, out: str, mode: str) -> dict:
    for loss in E2E_LOSSES:
        _e2e_run(rank, world, Path(out) / loss, loss, mode)
    return {}


@pytest.mark.parametrize("mode", ["data", "layers"])
def test_e2e_losses_on_two_ranks_equal_one_process(tmp_path, mode):
    results, hung = launch(_e2e_worker, tmp_path, str(tmp_path / "two"), mode)
    assert not hung and all(r["ok"] for r in results), results
    for loss in E2E_LOSSES:
        one = _e2e_run(0, 1, tmp_path / "one" / loss, loss)
        for s in _e2e_specs():
            two = load_coder(tmp_path / "two" / loss / s.name).state_dict()
            for k, v in one[s.name].state_dict().items():
                torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=f"{loss} {s.name} {k}")
        assert read_json(tmp_path / "two" / loss / "run.json")["objective"] == E2E_LOSSES[loss].to_dict()
    first, second = (load_coder(tmp_path / "two" / loss / "l0-topk").W_dec for loss in E2E_LOSSES)
    assert not torch.allclose(first, second, atol=1e-3)  # each objective shaped its own coder


# ---- failures ------------------------------------------------------------------------------------

def _dying_worker(rank: int, world: int, out: str, how: str) -> dict:
    spec = CoderSpec("c", HOOKPOINT, _cfg(k=3, tokens=16 * B, checkpoint_every=5))
    _Dying.how = how
    start = time.monotonic()
    try:
        Trainer([spec], {HOOKPOINT: TOY.d}, out, parallel=_Dying.current()).fit(
            shard_batches(_toy_source(), rank, world), progress=False)
    finally:
        Path(out, f"elapsed{rank}").write_text(str(time.monotonic() - start))
    return {}


@pytest.mark.parametrize("how,timeout", [("kill", 30.0), ("stall", 8.0)])
def test_a_lost_rank_fails_the_other_cleanly_and_the_run_resumes(tmp_path, how, timeout):
    out = tmp_path / "run"
    results, hung = launch(_dying_worker, tmp_path, str(out), how, timeout=timeout)
    assert hung == ([1] if how == "stall" else [])
    assert results[0]["error"] == "DistributedError", results
    assert "rank 0 of 2, step 12" in results[0]["message"] and "resume" in results[0]["message"]
    if how == "stall":
        assert f"did not answer within {timeout:g} s" in results[0]["message"]
    assert float((out / "elapsed0").read_text()) < timeout + 60  # failed, did not hang
    spec = CoderSpec("c", HOOKPOINT, _cfg(k=3, tokens=16 * B, checkpoint_every=5))
    assert (out / "checkpoint.safetensors").exists()
    resumed = Trainer([spec], {HOOKPOINT: TOY.d}, out).fit(_toy_source(), progress=False)["c"]  # on 1
    whole = Trainer([spec], {HOOKPOINT: TOY.d}, tmp_path / "one").fit(_toy_source(), progress=False)["c"]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


# ---- the command line ----------------------------------------------------------------------------

def test_torchrun_command_equals_one_process(tiny_model_folder, text_file, tmp_path, monkeypatch):
    from monosemantic.cli import main

    args = [str(tiny_model_folder), str(text_file), "--hookpoints", "model.layers.0", "model.layers.1",
            "--tokens", "2048", "--batch-size", "256", "--expansion", "2", "--k", "4",
            "--eval-tokens", "0", "--checkpoint-every", "3",
            # dead after two batches: after one (the default for this budget) a float-rounding
            # difference in the all-reduced sum can flip whether a feature fired in the first batch,
            # and with it AuxK's loss (seen at the top-k family's unit input scale: 2e-3 apart)
            "--dead-tokens", "512"]
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "monosemantic", "train", *args,
                          "--out", str(tmp_path / "two"), "--dist-timeout", "60"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("trained 2 coder(s)") == 1  # rank 0 reports
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    for name in ("model.layers.0", "model.layers.1"):
        one = load_coder(tmp_path / "one" / name).state_dict()
        for k, v in load_coder(tmp_path / "two" / name).state_dict().items():
            torch.testing.assert_close(v, one[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["done", "model.layers.0",
                                                                    "model.layers.1", "run.json"]
