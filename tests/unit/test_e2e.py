"""End-to-end and downstream losses (train/e2e.py) on tiny random Llama and GPT-2 models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import LAYER, make_lm, sample_documents
from monosemantic.data.tokens import special_token_ids
from monosemantic.hooks import hookpoint_widths
from monosemantic.models import decoder_layers
from monosemantic.train import CoderSpec, TrainConfig, Trainer
from monosemantic.train.e2e import (LossConfig, SplicedObjective, _splice_functions, downstream_layers,
                                    spliced_forward, token_batches)
from monosemantic.train.pipeline import train_spliced

CTX = 16


def _trainer(lm, tmp_path, hookpoints, loss="e2e", activation="topk", out_hookpoints=None, **kw):
    cfg = TrainConfig(activation=activation, n_features=64, k=4, tokens=CTX * 4 * 6,
                      batch_size=CTX * 4, coef=1.0 if activation == "relu" else 0.0,
                      kind="transcoder" if out_hookpoints else "sae", **kw)
    outs = out_hookpoints or [""] * len(hookpoints)
    specs = [CoderSpec(h.replace(":", "@"), h, cfg, o) for h, o in zip(hookpoints, outs)]
    objective = SplicedObjective(lm.model, LossConfig(loss=loss), specs, 6,
                                 special_token_ids(lm.tokenizer))
    widths = hookpoint_widths(lm.model, [h for s in specs for h in (s.hookpoint, s.out_hookpoint) if h])
    trainer = Trainer(specs, widths, tmp_path / "run", objective=objective)
    batches = token_batches(lm.tokenizer, sample_documents(), CTX, lm.bos_token_id, 4, 24)
    return trainer, objective, batches


@torch.no_grad()
def _make_identity(coder) -> None:
    """relu SAE with W_enc = W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    d = coder.cfg.d_in
    eye = torch.eye(d)
    coder.W_enc.copy_(torch.cat([eye, -eye]))
    coder.W_dec.copy_(torch.cat([eye, -eye]))
    coder.b_enc.zero_()
    coder.b_dec.zero_()


def test_e2e_loss_is_zero_for_an_exact_identity_stand_in(family, tmp_path):
    lm = make_lm(family)
    layer = LAYER[family]
    hps = [layer.format(0), layer.format(1) + ".mlp"]  # two coders spliced at once
    trainer, objective, batches = _trainer(lm, tmp_path, hps, loss="e2e+ds", activation="relu")
    assert objective.layers == decoder_layers(lm.model)[1:]  # after block 0; block 1 holds the mlp
    clean = objective.clean(next(batches(0)), 0)
    for st in trainer.states:
        _make_identity(st.coder)
    fns = _splice_functions(trainer, clean.mask, {})
    out = spliced_forward(lm.model, clean.tokens, clean.mask, fns, clean.logits, clean.layers)
    assert float(out.kl.detach()) < 1e-7
    assert list(out.ds) == objective.layers
    assert max(float(v.detach()) for v in out.ds.values()) < 1e-10
    # and a coder that is not the identity is not free: halve the residual stream after block 0
    with torch.no_grad():
        trainer.states[0].coder.W_dec.mul_(0.5)
    out = spliced_forward(lm.model, clean.tokens, clean.mask, _splice_functions(trainer, clean.mask, {}),
                          clean.logits, clean.layers)
    assert float(out.kl.detach()) > 1e-5 and min(float(v.detach()) for v in out.ds.values()) > 1e-3


def test_downstream_term_sums_over_the_later_blocks(family, tmp_path):
    lm = make_lm(family)
    layer = LAYER[family]
    blocks = [layer.format(i) for i in range(3)]
    assert downstream_layers(lm.model, [blocks[0]]) == blocks[1:]
    assert downstream_layers(lm.model, [blocks[1] + ".mlp"]) == blocks[1:]
    assert downstream_layers(lm.model, [blocks[2] + ".mlp:input", blocks[0]]) == blocks[1:]
    assert downstream_layers(lm.model, [blocks[2]]) == []
    trainer, objective, batches = _trainer(lm, tmp_path, [blocks[0]], loss="e2e+ds")
    assert objective.layers == blocks[1:]
    clean = objective.clean(next(batches(0)), 0)
    assert set(clean.layers) == set(blocks[1:])
    # zero the kept positions of block 1's output: its term is exactly 1 (all of its norm lost)
    fns = {blocks[1]: lambda t: torch.where(clean.mask[..., None], torch.zeros_like(t), t)}
    out = spliced_forward(lm.model, clean.tokens, clean.mask, fns, clean.logits, clean.layers)
    assert list(out.ds) == blocks[1:]
    assert float(out.ds[blocks[1]].detach()) == pytest.approx(1.0, abs=1e-6)
    assert 0 < float(out.ds[blocks[2]].detach())


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_gradients_reach_only_the_coders_and_the_model_never_changes(family, tmp_path, activation):
    lm = make_lm(family)
    for p in lm.model.parameters():  # even a model handed over trainable is frozen by the objective
        p.requires_grad_(True)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    layer = LAYER[family]
    trainer, objective, batches = _trainer(lm, tmp_path, [layer.format(0)], loss="e2e+ds",
                                           activation=activation)
    assert not any(p.requires_grad for p in lm.model.parameters())
    clean = objective.clean(next(batches(0)), 0)
    trainer._initialize(clean.acts)
    coder = trainer.states[0].coder
    start = {k: v.clone() for k, v in coder.state_dict().items()}
    objective.step(trainer, clean, 0)
    assert all(p.grad is None for p in lm.model.parameters())
    assert coder.W_enc.grad is not None and coder.W_enc.grad.abs().sum() > 0
    assert coder.W_dec.grad.abs().sum() > 0
    assert not torch.equal(coder.W_dec, start["W_dec"])
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {"kl", "ds", "l0", "fvu"} <= set(trainer.states[0].last)


def test_e2e_training_lowers_the_kl_and_records_its_objective(tmp_path, documents):
    lm = make_lm("llama")
    cfg = TrainConfig(n_features=64, k=4, tokens=CTX * 4 * 40, batch_size=CTX * 4, lr=3e-3)
    spec = CoderSpec("l1", "model.layers.1", cfg)
    first = {}

    class Spy(SplicedObjective):
        def step(self, trainer, clean, step):
            super().step(trainer, clean, step)
            first.setdefault("kl", trainer.states[0].last["kl"])
    import monosemantic.train.pipeline as pipeline
    orig = pipeline.SplicedObjective
    pipeline.SplicedObjective = Spy
    try:
        coders = train_spliced(lm, _corpus(tmp_path), [spec], tmp_path / "run", LossConfig("e2e"),
                               ctx_len=CTX, progress=False)
    finally:
        pipeline.SplicedObjective = orig
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["objective"]["loss"] == "e2e"
    final = json.loads((tmp_path / "run" / "l1" / "training.json").read_text())["final"]
    assert final["kl"] < 0.5 * first["kl"]
    assert final["l0"] <= 4
    assert set(coders) == {"l1"}


def test_local_then_kl_finetune_switches_at_the_right_step(tmp_path):
    lm = make_lm("gpt2")
    cfg = TrainConfig(n_features=64, k=4, tokens=CTX * 4 * 10, batch_size=CTX * 4)
    spec = CoderSpec("t", "transformer.h.0.mlp:input", dataclass_replace(cfg, kind="transcoder"),
                     "transformer.h.0.mlp")
    seen = []

    class Spy(SplicedObjective):
        def step(self, trainer, clean, step):
            seen.append(step)
            super().step(trainer, clean, step)
    import monosemantic.train.pipeline as pipeline
    orig = pipeline.SplicedObjective
    pipeline.SplicedObjective = Spy
    try:
        train_spliced(lm, _corpus(tmp_path), [spec], tmp_path / "run",
                      LossConfig("local", kl_finetune_frac=0.3), ctx_len=CTX, progress=False)
    finally:
        pipeline.SplicedObjective = orig
    assert seen == [7, 8, 9]
    final = json.loads((tmp_path / "run" / "t" / "training.json").read_text())["final"]
    assert "kl" in final


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "mse"}, "loss="), ({"kl_coef": -1}, "kl_coef"),
    ({"loss": "e2e", "kl_finetune_frac": 0.2}, "kl_finetune_frac"),
    ({"kl_finetune_frac": 1.0}, "kl_finetune_frac")])
def test_bad_loss_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_batch_size_must_be_whole_contexts(tmp_path):
    lm = make_lm("llama")
    spec = CoderSpec("l1", "model.layers.1", TrainConfig(tokens=200, batch_size=40))
    with pytest.raises(ValueError, match="multiple of ctx_len"):
        train_spliced(lm, _corpus(tmp_path), [spec], tmp_path / "run", LossConfig("e2e"), ctx_len=CTX)


def test_forward_dtype_is_refused_where_nothing_is_cached(tmp_path):
    from monosemantic.train.pipeline import train_on_corpus

    spec = CoderSpec("l1", "model.layers.1", TrainConfig(tokens=256, batch_size=64))
    with pytest.raises(ValueError, match="the 'e2e' loss caches nothing: drop --forward-dtype"):
        train_on_corpus(make_lm("llama"), _corpus(tmp_path), [spec], tmp_path / "run", ctx_len=CTX,
                        loss=LossConfig("e2e"), forward_dtype="bfloat16")
    assert not (tmp_path / "run").exists()


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(sample_documents(200, seed=3)))
    return str(path)


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_killed_e2e_run_resumes_to_identical_bits(tmp_path):
    lm = make_lm("llama")
    cfg = TrainConfig(n_features=64, k=4, tokens=CTX * 4 * 8, batch_size=CTX * 4, checkpoint_every=3)
    spec = [CoderSpec("c", "model.layers.1", cfg)]
    loss = LossConfig("local", kl_finetune_frac=0.5)  # local steps 0-3, spliced steps 4-7

    def trainer(out):
        obj = SplicedObjective(lm.model, loss, spec, 8, special_token_ids(lm.tokenizer))
        return Trainer(spec, {"model.layers.1": 32}, out, objective=obj)

    batches = token_batches(lm.tokenizer, sample_documents(), CTX, lm.bos_token_id, 4, 32)

    def dying(start):
        for step, b in enumerate(batches(start), start):
            if step == 7:  # after the checkpoint at step 6
                raise KeyboardInterrupt
            yield b
    whole = trainer(tmp_path / "a").fit(batches, progress=False)["c"].state_dict()
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b").fit(dying, progress=False)
    resumed = trainer(tmp_path / "b").fit(batches, progress=False)["c"].state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
