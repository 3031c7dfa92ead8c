"""Trainer: exact resume, several coders from one pass, and bad input that loses nothing."""

import json
import math

import pytest
import torch

from monosemantic.coders import load_coder
from monosemantic.toy import ToyConfig, ToyData
from monosemantic.train import CoderSpec, TrainConfig, Trainer
from monosemantic.train.toy_run import HOOKPOINT, toy_batches

TOY = ToyConfig(d=16, n_features=32, mean_active=2, seed=1)
BASE = dict(tokens=256 * 24, batch_size=256, n_features=48, lr=3e-3, checkpoint_every=5, log_every=5)


def _trainer(out, specs=None, widths=None):
    specs = specs or [CoderSpec("c", HOOKPOINT, TrainConfig(k=3, **BASE))]
    return Trainer(specs, widths or {HOOKPOINT: TOY.d}, out)


def _batches(seed=0):
    return toy_batches(ToyData(TOY), BASE["batch_size"], seed)


def _with_huge_row(at_step, row, factor=1000.0):
    """The toy batches with one row of one step's batch scaled up (a massive-activation token)."""
    def from_step(start):
        for i, b in enumerate(_batches()(start)):
            if start + i == at_step:
                b = {HOOKPOINT: b[HOOKPOINT].clone()}
                b[HOOKPOINT][row] *= factor
            yield b
    return from_step


class Interrupt(Exception):
    pass


def _interrupting(batches, at):
    def from_step(start):
        for i, b in enumerate(batches(start)):
            if start + i == at:
                raise Interrupt
            yield b
    return from_step


def _tensors(coder):
    return {k: v.clone() for k, v in coder.state_dict().items()}


@pytest.mark.parametrize("activation,extra", [("topk", {"k": 3}), ("batchtopk", {"k": 3}),
                                              ("relu", {"coef": 0.3, "resample_every": 7}),
                                              ("jumprelu", {"coef": 0.01})])
def test_killed_run_resumes_to_identical_bits(tmp_path, activation, extra):
    cfg = TrainConfig(activation=activation, **{**BASE, **extra})
    spec = [CoderSpec("c", HOOKPOINT, cfg)]
    whole = _trainer(tmp_path / "a", spec).fit(_batches(), progress=False)["c"]
    with pytest.raises(Interrupt):  # dies at step 13, two steps after the checkpoint at 10
        _trainer(tmp_path / "b", spec).fit(_interrupting(_batches(), 13), progress=False)
    assert (tmp_path / "b" / "checkpoint.safetensors").exists()
    resumed = _trainer(tmp_path / "b", spec).fit(_batches(), progress=False)["c"]
    a, b = _tensors(whole), _tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "b" / "done").exists() and not (tmp_path / "b" / "checkpoint.safetensors").exists()


def test_several_coders_from_one_pass_equal_separate_runs(tmp_path):
    specs = [CoderSpec("k2", HOOKPOINT, TrainConfig(k=2, **BASE)),
             CoderSpec("k4", HOOKPOINT, TrainConfig(k=4, **BASE))]
    together = _trainer(tmp_path / "both", specs).fit(_batches(), progress=False)
    for spec in specs:
        alone = _trainer(tmp_path / spec.name, [spec]).fit(_batches(), progress=False)[spec.name]
        for k, v in _tensors(alone).items():
            assert torch.equal(v, together[spec.name].state_dict()[k]), (spec.name, k)


def test_saved_coder_maps_raw_inputs_and_learns(tmp_path):
    coder = _trainer(tmp_path).fit(_batches(), progress=False)["c"]
    loaded = load_coder(tmp_path / "c")
    x = ToyData(TOY).sample(2048, torch.Generator().manual_seed(5)).x
    with torch.no_grad():
        out = loaded(x).out
    fvu = float((x - out).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.5  # a 24-step toy run: well below the 1.0 of predicting the mean
    assert torch.allclose(loaded.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert torch.equal(out, coder(x).out.detach())
    info = json.loads((tmp_path / "c" / "training.json").read_text())
    assert info["steps"] == 24 and info["normalization"]["in_scale"] > 0


def test_input_norm_sets_the_training_scale_and_is_folded_away(tmp_path):
    first = next(_batches()(0))[HOOKPOINT]
    mean_sq = float(first.pow(2).sum(1).mean())
    x = ToyData(TOY).sample(512, torch.Generator().manual_seed(5)).x
    for norm, want in ((0.0, TOY.d), (1.0, 1.0)):
        cfg = TrainConfig(k=3, input_norm=norm, **BASE)
        coder = _trainer(tmp_path / f"n{norm}", [CoderSpec("c", HOOKPOINT, cfg)]).fit(_batches(), progress=False)["c"]
        scale = json.loads((tmp_path / f"n{norm}" / "c" / "training.json").read_text())["normalization"]["in_scale"]
        assert scale ** 2 * mean_sq == pytest.approx(want, rel=1e-5)  # E||x||^2 of the first batch
        with torch.no_grad():
            fvu = float((x - coder(x).out).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert fvu < 0.5  # the scale is folded into the weights: raw inputs in, raw outputs out
    with pytest.raises(ValueError, match="input_norm=-1"):
        TrainConfig(k=3, input_norm=-1.0, **BASE)


def test_scale_ignores_a_massive_token_in_the_first_batch(tmp_path):
    """One outlier token must not set the normalisation (it would rescale every coefficient)."""
    with_outlier = _with_huge_row(at_step=0, row=7)
    scales = {}
    for name, batches in (("clean", _batches()), ("outlier", with_outlier)):
        cfg = TrainConfig(activation="relu", coef=0.3, **BASE)
        _trainer(tmp_path / name, [CoderSpec("c", HOOKPOINT, cfg)]).fit(batches, progress=False)
        info = json.loads((tmp_path / name / "c" / "training.json").read_text())
        scales[name] = info["normalization"]["in_scale"]
    first = next(_batches()(0))[HOOKPOINT]
    typical = torch.cat([first[:7], first[8:]])
    assert scales["outlier"] == pytest.approx(math.sqrt(TOY.d / float(typical.pow(2).sum(1).mean())), rel=1e-5)
    assert scales["outlier"] == pytest.approx(scales["clean"], rel=0.02)
    assert info["n_outliers"] >= 1  # counted and trained on


def test_output_folder_holding_another_run_is_refused(tmp_path):
    _trainer(tmp_path, [CoderSpec("c", HOOKPOINT, TrainConfig(k=3, **BASE))])
    with pytest.raises(ValueError, match="holds a different run.*config.k: was 3, now 4"):
        _trainer(tmp_path, [CoderSpec("c", HOOKPOINT, TrainConfig(k=4, **BASE))])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no run.json"):
        _trainer(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_run_written_before_a_config_field_existed_is_still_the_same_run(tmp_path):
    whole = _trainer(tmp_path).fit(_batches(), progress=False)["c"]
    run = json.loads((tmp_path / "run.json").read_text())
    del run["coders"][0]["config"]["calibrate_init"]  # as written before the field was added
    (tmp_path / "run.json").write_text(json.dumps(run))
    again = _trainer(tmp_path).fit(_batches(), progress=False)["c"]
    assert torch.equal(again.W_dec, whole.W_dec)
    run["coders"][0]["config"]["k"] = 4  # a real difference is still refused
    (tmp_path / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="config.k: was 4, now 3"):
        _trainer(tmp_path)


def test_resume_with_a_different_hookpoint_width_is_refused(tmp_path):
    _trainer(tmp_path, widths={HOOKPOINT: 16})
    with pytest.raises(ValueError, match="d_in: was 16, now 24"):
        _trainer(tmp_path, widths={HOOKPOINT: 24})


def test_nan_in_activations_stops_before_touching_weights(tmp_path):
    good = _batches()

    def poisoned(start):
        for i, b in enumerate(good(start)):
            if start + i == 12:
                b = {HOOKPOINT: b[HOOKPOINT].clone()}
                b[HOOKPOINT][7, 3] = float("nan")
            yield b

    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"non-finite activation \(nan\) at hookpoint toy, step 12, batch row 7, dim 3"):
        trainer.fit(poisoned, progress=False)
    assert all(torch.isfinite(p).all() for p in trainer.states[0].coder.parameters())
    # the checkpoint from step 10 is intact: resuming on clean data finishes with finite weights
    resumed = _trainer(tmp_path).fit(good, progress=False)["c"]
    assert all(torch.isfinite(p).all() for p in resumed.parameters())


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    with pytest.raises(Interrupt):
        _trainer(tmp_path).fit(_interrupting(_batches(), 12), progress=False)
    path = tmp_path / "checkpoint.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checkpoint .* is corrupt or truncated"):
        _trainer(tmp_path).fit(_batches(), progress=False)


def test_unset_options_resolve_by_architecture(tmp_path):
    """TopK trains at unit input scale, with Kaiming-scale encoder rows, unclipped, on the FVU
    loss; BatchTopK and the penalty family at sqrt(D) scale (the penalties' units), calibrated,
    clipped at 1, on squared error; explicit values win."""
    names = ("grad_clip", "input_norm", "calibrate_init", "init_encoder_norm", "recon_loss")
    kaiming = 3 ** -0.5
    for activation, want in (("topk", (0.0, 1.0, False, kaiming, "fvu")),
                             ("batchtopk", (1.0, 0.0, True, 1.0, "mse")),
                             ("relu", (1.0, 0.0, True, 1.0, "mse")), ("jumprelu", (1.0, 0.0, True, 1.0, "mse"))):
        r = TrainConfig(activation=activation, coef=1.0).resolve(16)
        assert tuple(getattr(r, n) for n in names) == want, activation
    r = TrainConfig(grad_clip=2.0, input_norm=0.0, calibrate_init=True, recon_loss="mse").resolve(16)
    assert tuple(getattr(r, n) for n in names) == (2.0, 0.0, True, 1.0, "mse")
    r = TrainConfig(activation="batchtopk", calibrate_init=False, init_encoder_norm=0.3,
                    recon_loss="fvu").resolve(16)
    assert (r.calibrate_init, r.init_encoder_norm, r.recon_loss) == (False, 0.3, "fvu")
    with pytest.raises(ValueError, match="encoder is calibrated by default: also set calibrate_init false"):
        TrainConfig(activation="batchtopk", init_encoder_norm=0.3).resolve(16)
    _trainer(tmp_path).fit(_batches(), progress=False)  # what the run used is recorded
    info = json.loads((tmp_path / "c" / "training.json").read_text())
    assert tuple(info[n] for n in names) == (0.0, 1.0, False, pytest.approx(kaiming), "fvu")


def test_command_line_sets_or_leaves_the_architecture_dependent_options():
    import simple_parsing

    from monosemantic.cli import TrainArgs

    def parse(*extra):
        return simple_parsing.parse(TrainArgs, args=["m", "c", *extra]).train

    assert (parse().grad_clip, parse().input_norm, parse().calibrate_init) == (None, None, None)
    assert parse("--calibrate_init").calibrate_init is True  # a bare flag means true
    assert parse("--calibrate_init", "false").calibrate_init is False
    assert (parse("--grad_clip", "0.5").grad_clip, parse("--input_norm", "0").input_norm) == (0.5, 0.0)
    assert parse("--recon_loss", "mse").recon_loss == "mse"
    for bare in ("--grad_clip", "--input_norm", "--recon_loss", "--init_encoder_norm"):
        with pytest.raises(SystemExit):  # "expected one argument", not a silent unset
            parse(bare)


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="relu", coef=0.0), "coef=0.0: activation='relu'"),
    (dict(activation="jumprelu"), "coefficient must be > 0"),
    (dict(tokens=100, batch_size=256), "less than one batch"),
    (dict(lr_warmup=2.0), "lr_warmup=2.0 must be a fraction"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0 must be >= 0"),
    (dict(recon_loss="l1"), "recon_loss='l1' is unknown; pick one of mse, fvu"),
    (dict(init_encoder_norm=0.0), "init_encoder_norm=0.0 must be > 0"),
    (dict(batch_size=1, tokens=10), "the fvu loss divides by the batch's variance"),
    (dict(init_encoder_norm=0.5, calibrate_init=True), "drop it or set calibrate_init false"),
])
def test_bad_training_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_k_larger_than_the_width_is_refused(tmp_path):
    spec = CoderSpec("c", HOOKPOINT, TrainConfig(**{**BASE, "n_features": 8}, k=16))
    with pytest.raises(ValueError, match="k=16 is larger than the width n_features=8"):
        _trainer(tmp_path, [spec])


def test_transcoder_needs_an_output_hookpoint(tmp_path):
    spec = CoderSpec("c", HOOKPOINT, TrainConfig(kind="transcoder", k=3, **BASE))
    with pytest.raises(ValueError, match="needs an output hookpoint"):
        _trainer(tmp_path, [spec])


@pytest.mark.parametrize("activation", ["topk", "relu", "gated", "jumprelu"])
def test_resampling_resets_every_per_feature_parameter(activation):
    from monosemantic.coders import CoderConfig, build_coder
    from monosemantic.train.dead import resample_dead

    torch.manual_seed(0)
    extra = {"k": 3} if activation == "topk" else {}
    coder = build_coder(CoderConfig(d_in=8, n_features=16, activation=activation, **extra))
    opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    with torch.no_grad():
        coder.b_enc.normal_()
        if activation == "jumprelu":
            coder.threshold.copy_(torch.linspace(0.1, 1.6, 16))
        if activation == "gated":
            coder.r_mag.normal_()
            coder.b_mag.normal_()
    out = coder(x)
    ((x - out.out).pow(2).sum() + out.acts.sum() + out.aux_loss).backward()
    opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    idx = dead.nonzero().flatten()
    assert resample_dead(coder, opt, x, x, dead, torch.Generator().manual_seed(0)) == 3
    # SAE: the encoder reads the residual direction the decoder writes
    cos = torch.nn.functional.cosine_similarity(coder.W_enc[idx], coder.W_dec[idx], dim=1)
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)
    if activation == "gated":  # the gate bias opens it only near its source, see the next test
        assert coder.b_enc[idx].max() <= 0
    else:
        assert coder.b_enc[idx].abs().max() == 0
    for p in coder.per_feature_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key][idx].abs().max() == 0
            assert opt.state[p][key][~dead].abs().max() > 0
    if activation == "jumprelu":  # the median live threshold at most
        assert (coder.threshold[idx] <= coder.threshold[~dead].median()).all()
        assert (coder.threshold[idx] > 0).all()
        assert any(p is coder.threshold for p in coder.per_feature_parameters())
    if activation == "gated":
        assert coder.r_mag[idx].abs().max() == 0
        assert coder.b_mag[idx].abs().max() == 0
    w = coder.W_enc.detach()
    enc_norm_ratio = w[idx].norm(dim=1).mean() / w[~dead].norm(dim=1).mean()
    assert float(enc_norm_ratio) == pytest.approx(1.0 if activation == "topk" else 0.2, rel=0.05)


@pytest.mark.parametrize("activation", ["jumprelu", "gated"])
def test_a_resampled_feature_fires_on_the_input_it_was_drawn_for(activation):
    """A resampled row is short (0.2 x the mean encoder norm): under the live features' threshold
    (JumpReLU) or with a zero gate bias (gated) it would never fire, or fire on half of all inputs.
    It must fire on its source input, and not on one a third as aligned with it."""
    from monosemantic.coders import CoderConfig, build_coder

    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=8, n_features=16, activation=activation))
    with torch.no_grad():
        coder.b_dec.zero_()
        if activation == "jumprelu":
            coder.threshold.fill_(5.0)  # far above a short new row's pre-activation
        idx = torch.tensor([2, 5, 11])
        source = torch.randn(3, 8)
        rows = 0.2 * source / source.norm(dim=1, keepdim=True)
        coder.reset_features(idx, rows, rows / 0.2, source=source)
        own = coder(source).acts[torch.arange(3), idx]
        weak = coder(source / 3).acts[torch.arange(3), idx]
    assert (own > 0).all()
    assert (weak == 0).all()
    if activation == "jumprelu":
        assert (coder.threshold[idx] < 5.0).all()


@pytest.mark.parametrize("activation,every,expected", [
    ("topk", 400, (400, 800, 1200, 1600)),        # asked for: every 400 steps before the decay
    ("topk", 0, ()),                              # the top-k family has AuxK
    ("relu", 0, (500, 1000, 1500)),               # 1/4, 1/2, 3/4
    ("relu", -1, ())])
@pytest.mark.parametrize("decay", [0.2, 0.0])  # no decay: still none in the last 20% of steps
def test_resampling_stops_before_the_lr_decay(activation, every, expected, decay):
    # 2,000 steps, LR decay over the last 20% (from step 1,600): nothing resampled from then on,
    # since a fresh feature has no LR left to settle (a top-k toy run at 2N lost its whole FVU to
    # features resampled in its last 25 steps)
    cfg = TrainConfig(activation=activation, k=4, coef=1.0 if activation == "relu" else 0.0,
                      tokens=2000 * 256, batch_size=256, resample_every=every, lr_decay=decay)
    steps = cfg.resolve(16).resample_steps
    assert steps == tuple(s for s in expected if s < 1600)


def _with_outliers(batches):
    """From step 1 on, rows 0-3 of every batch are 100x a typical token (norm > 10x the median)."""
    def from_step(start):
        for s, b in enumerate(batches(start), start):
            x = b[HOOKPOINT].clone()
            if s > 0:
                x[:4] *= 100.0
            yield {HOOKPOINT: x}
    return from_step


def test_outliers_are_counted_and_trained_on_unless_dropped(tmp_path):
    runs = {}
    for drop in (False, True):
        spec = CoderSpec("c", HOOKPOINT, TrainConfig(k=3, drop_outliers=drop, **{**BASE, "tokens": 256 * 4}))
        coder = _trainer(tmp_path / str(drop), [spec]).fit(_with_outliers(_batches()), progress=False)["c"]
        info = json.loads((tmp_path / str(drop) / "c" / "training.json").read_text())
        assert info["n_outliers"] == 3 * 4 and info["outliers_dropped"] is drop
        assert ("left out of training" if drop else "trained on") in info["outlier_rule"]
        runs[drop] = coder
    # the outlier rows moved the weights only where they were trained on
    assert not torch.allclose(runs[False].W_dec, runs[True].W_dec, atol=1e-4)


def test_gradient_clipping_caps_the_norm_the_optimizer_sees():
    from monosemantic.train.config import clip_gradients

    coder = torch.nn.Linear(4, 3)
    for p in coder.parameters():
        p.grad = torch.full_like(p, 2.0)  # norm sqrt(15) * 2
    assert clip_gradients(coder, 0.0) is None  # off: untouched
    assert torch.equal(coder.weight.grad, torch.full((3, 4), 2.0))
    before = clip_gradients(coder, 1.0)
    assert before == pytest.approx(2 * 15 ** 0.5)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in coder.parameters()]))
    assert after == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(coder, 10.0) == pytest.approx(1.0, rel=1e-5)  # below the cap: unchanged
    assert torch.allclose(coder.bias.grad, torch.full((3,), 2 / (2 * 15 ** 0.5)))


def test_a_spike_batch_moves_a_clipped_coder_less(tmp_path):
    """One batch with a token 1000x the others' norm: without clipping its gradient dominates
    Adam's second moments; with grad_clip the step after it is as large as the steps before."""
    def run(out, clip):
        cfg = TrainConfig(k=3, grad_clip=clip, recon_loss="mse",  # fvu would shrink the spike too
                          **{**BASE, "tokens": 256 * 6, "lr_warmup": 0.0})
        tr = _trainer(out, [CoderSpec("c", HOOKPOINT, cfg)])
        norms = []
        step = tr._step

        def wrapped(st, batch, i):
            step(st, batch, i)
            norms.append(st.last.get("grad_norm"))
        tr._step = wrapped

        tr.fit(_with_huge_row(at_step=3, row=0), progress=False)
        return norms, tr.states[0].opt
    norms, opt = run(tmp_path / "clip", 1.0)
    assert len(norms) == 6 and norms[3] > 100 * max(norms[:3])  # the spike, measured before clipping
    v_clip = max(float(s["exp_avg_sq"].max()) for s in opt.state.values())
    free, opt = run(tmp_path / "free", 0.0)
    assert free == [None] * 6  # no pass over the gradients when off
    v_free = max(float(s["exp_avg_sq"].max()) for s in opt.state.values())
    assert v_free > 100 * v_clip


@pytest.mark.parametrize("activation,extra", [("topk", {"k": 3}), ("relu", {"coef": 0.3})])
def test_fvu_loss_is_the_mse_loss_over_the_batch_variance(tmp_path, activation, extra):
    """recon_loss fvu: every gradient is the mse loss's times B / (the batch's total variance), so
    a batch holding a massive token weighs less."""
    grads = {}
    for loss in ("mse", "fvu"):
        cfg = TrainConfig(activation=activation, recon_loss=loss, grad_clip=0.0, sparse_adam=False,
                          **{**BASE, **extra, "tokens": 256 * 4, "lr_warmup": 0.0})
        tr = _trainer(tmp_path / loss, [CoderSpec("c", HOOKPOINT, cfg)])
        seen = []
        tr.states[0].opt.register_step_pre_hook(
            lambda opt, *_: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
        tr.fit(_with_huge_row(at_step=2, row=0), progress=False)
        grads[loss], scale = seen, tr.states[0].scale_in
    x = next(_with_huge_row(at_step=2, row=0)(0))[HOOKPOINT] * scale  # the runs agree until the
    total = float((x - x.mean(0)).pow(2).sum())                           # first update
    for a, b in zip(grads["mse"][0], grads["fvu"][0]):
        torch.testing.assert_close(b, a * x.shape[0] / total, rtol=1e-4, atol=1e-9)
    assert all(torch.isfinite(g).all() for gs in grads["fvu"] for g in gs)
    # the spike batch's gradient, relative to the one before it, is far smaller under fvu
    norm = [[float(torch.cat([g.flatten() for g in gs]).norm()) for gs in grads[loss]] for loss in grads]
    assert norm[0][2] / norm[0][1] > 50 * norm[1][2] / norm[1][1]


def test_opposite_infinities_in_one_batch_are_caught():
    from monosemantic.train.loop import _check_finite

    x = torch.zeros(4, 3)
    x[1, 2], x[3, 0] = float("inf"), float("-inf")  # their sum is nan, the fast check's signal
    with pytest.raises(ValueError, match=r"non-finite activation \(inf\) at hookpoint h, step 5, batch row 1, dim 2"):
        _check_finite("h", x, 5)
    _check_finite("h", torch.full((4, 3), 3e38), 5)  # finite values whose sum overflows pass


def test_releasing_free_memory_needs_no_glibc(monkeypatch):
    from monosemantic import utils

    utils.release_free_memory()  # glibc here: malloc_trim runs
    monkeypatch.setattr(utils.ctypes, "CDLL", lambda name: object())  # a C library without it
    utils.release_free_memory()


def test_keeping_freed_memory_respects_the_users_malloc_settings(monkeypatch):
    import os
    import subprocess
    import sys

    from monosemantic import utils

    code = "from monosemantic.utils import keep_freed_memory as k; print(k())"
    env = {k: v for k, v in os.environ.items() if k not in utils.MALLOC_ENV}
    glibc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout.lower()
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.stdout.strip() == ("True" if ("glibc" in glibc or "gnu libc" in glibc) else "False")
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"  # the user's own policy stands
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.stdout.strip() == "False"
    monkeypatch.setattr(utils.ctypes, "CDLL", lambda name: object())  # a C library without mallopt
    for name in utils.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert utils.keep_freed_memory() is False
