"""Spliced evaluation and the shrinkage refit, on tiny random models, against hand computations."""

import json

import pytest
import torch

from monosemantic.cli import main
from monosemantic.coders import CoderConfig, build_coder
from monosemantic.data import iter_contexts, keep_mask, special_token_ids
from monosemantic.evaluate import evaluate_coders
from monosemantic.evaluate.shrinkage import refit_magnitudes
from monosemantic.hooks import capture, patch
from monosemantic.metrics import fvu, relative_reconstruction_bias

HP = "model.layers.1"


def _identity(d=32):
    coder = build_coder(CoderConfig(d_in=d, n_features=8, kind="skip_transcoder", activation="relu",
                                    hookpoint=HP, out_hookpoint=HP))
    with torch.no_grad():
        coder.W_dec.zero_()
        coder.W_skip.copy_(torch.eye(d))
    return coder


def _random_sae(seed=0, d=32):
    torch.manual_seed(seed)
    return build_coder(CoderConfig(d_in=d, n_features=64, activation="topk", k=4, hookpoint=HP)).eval()


def _batch(llama, documents, n=4, ctx=32):
    ctxs = list(iter_contexts(llama.tokenizer, documents, ctx, llama.bos_token_id))[:n]
    return torch.from_numpy(__import__("numpy").stack(ctxs))


def test_identity_coder_splices_to_the_clean_model(llama, documents):
    res = evaluate_coders(llama, {"id": _identity()}, documents, 256, ctx_len=32, batch_size=4,
                          exclude_ids=special_token_ids(llama.tokenizer), progress=False)["id"]
    assert res.ce_spliced == pytest.approx(res.ce_clean, abs=1e-6)
    assert res.kl == pytest.approx(0.0, abs=1e-6)
    assert res.ce_loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert res.ce_zero > res.ce_clean + 1e-3  # zero-ablating a layer does change the model
    assert res.recon.fvu == pytest.approx(0.0, abs=1e-10)


def test_metrics_equal_a_hand_computation(llama, documents):
    coder = _random_sae()
    exclude = special_token_ids(llama.tokenizer)
    res = evaluate_coders(llama, {"c": coder}, documents, 100, ctx_len=32, batch_size=4,
                          exclude_ids=exclude, progress=False)["c"]
    tokens = _batch(llama, documents)  # the first batch holds > 100 kept tokens: one batch is used
    mask = keep_mask(tokens, exclude)
    assert int(mask.sum()) > 100
    flat = mask.flatten()  # of which the first 100 kept tokens are scored (and spliced)
    flat[flat.nonzero(as_tuple=True)[0][100:]] = False
    mask = flat.view_as(mask)
    with torch.no_grad():
        with capture(llama.model, [HP]) as acts:
            clean = llama.model(input_ids=tokens).logits
        x = acts[HP][mask]
        out = coder(x).out

        def splice(t):
            return torch.where(mask[..., None], coder(t.reshape(-1, 32)).out.reshape(t.shape), t)

        with patch(llama.model, {HP: splice}):
            spliced = llama.model(input_ids=tokens).logits
    assert res.n_tokens == int(mask.sum()) == 100
    assert res.recon.fvu == pytest.approx(float(fvu(out, x)), rel=1e-5)
    assert res.recon.relative_reconstruction_bias == pytest.approx(
        float(relative_reconstruction_bias(out, x)), rel=1e-5)
    assert res.recon.l0 == pytest.approx(4.0)

    def ce(logits):
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return float(-logp[mask[:, :-1]].mean())

    assert res.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert res.ce_spliced == pytest.approx(ce(spliced), rel=1e-5)
    logp, logq = torch.log_softmax(clean, -1), torch.log_softmax(spliced, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)[mask]
    assert res.kl == pytest.approx(float(kl.mean()), rel=1e-4)
    # BOS (excluded) keeps its clean activation: its prediction is untouched by the splice
    assert torch.allclose(clean[:, 0], spliced[:, 0])


def test_coders_evaluated_together_equal_each_alone(llama, documents):
    """The zero-ablation forward is shared by the coders writing to one hookpoint."""
    coders = {"a": _random_sae(0), "b": _random_sae(1), "id": _identity()}
    kw = dict(ctx_len=32, batch_size=4, exclude_ids=special_token_ids(llama.tokenizer), progress=False)
    together = evaluate_coders(llama, coders, documents, 200, **kw)
    for name, coder in coders.items():
        alone = evaluate_coders(llama, {name: coder}, documents, 200, **kw)[name]
        for key in ("ce_clean", "ce_spliced", "ce_zero", "kl", "kl_zero", "ce_loss_recovered", "n_tokens"):
            assert getattr(together[name], key) == getattr(alone, key), (name, key)
    assert together["a"].ce_spliced != together["b"].ce_spliced
    assert together["a"].kl_zero > 0


def test_evaluation_in_cpu_streams_equals_one_stream(llama, documents, monkeypatch):
    """With 2 threads each batch's contexts are evaluated as 2 side-by-side streams (their CE and
    KL sums added, their activations scored in turn): the same results as one stream."""
    coders = {"a": _random_sae(0), "id": _identity()}
    kw = dict(ctx_len=32, batch_size=4, exclude_ids=special_token_ids(llama.tokenizer), progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        streamed = evaluate_coders(llama, coders, documents, 200, **kw)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("MONOSEMANTIC_FORWARD_STREAMS", "0")
        single = evaluate_coders(llama, coders, documents, 200, **kw)
    finally:
        torch.set_num_threads(threads)
    for name in coders:
        a, b = streamed[name], single[name]
        assert a.n_tokens == b.n_tokens == 200
        for key in ("ce_clean", "ce_spliced", "ce_zero", "kl", "kl_zero"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-7), (name, key)
        assert a.recon.fvu == pytest.approx(b.recon.fvu, rel=1e-5)
        assert a.recon.l0 == pytest.approx(b.recon.l0, rel=1e-6)
    assert streamed["a"].kl > 0


def test_refit_removes_shrinkage_and_folds_exactly():
    torch.manual_seed(0)
    d, f = 16, 32
    dirs = torch.nn.functional.normalize(torch.randn(f, d), dim=1)
    codes = torch.rand(4096, f) * (torch.rand(4096, f) < 0.1)
    x = codes @ dirs
    coder = build_coder(CoderConfig(d_in=d, n_features=f, activation="relu"))
    with torch.no_grad():  # a coder that knows the directions but undershoots by half
        coder.W_dec.copy_(dirs)
        coder.b_dec.zero_()
        coder.W_enc.copy_(0.5 * torch.linalg.pinv(dirs).T)
        coder.b_enc.zero_()
        shrunk = coder(x).out
        fit = refit_magnitudes(coder, x)
        fixed = fit.coder(x).out
        assert float(relative_reconstruction_bias(shrunk, x)) < 0.6
        assert float(relative_reconstruction_bias(fixed, x)) == pytest.approx(1.0, abs=0.02)
        assert float(fvu(fixed, x)) < 0.5 * float(fvu(shrunk, x))
        assert torch.allclose(fit.coder.encode(x).acts, fit.gains * coder.encode(x).acts, atol=1e-5)
        assert torch.allclose(fit.coder.W_dec.norm(dim=1), coder.W_dec.norm(dim=1))


def test_refit_of_topk_uses_one_gain_and_keeps_selection():
    coder = _random_sae()
    x = torch.randn(512, 32)
    with torch.no_grad():
        fit = refit_magnitudes(coder, x)
        assert torch.all(fit.gains == fit.gains[0])
        assert torch.equal(fit.coder.encode(x).acts > 0, coder.encode(x).acts > 0)


def test_cli_train_then_eval_on_a_tiny_model(tiny_model_folder, documents, tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / "cache"))
    text_file = tmp_path / "docs.txt"  # documents separated by blank lines
    text_file.write_text("\n\n".join(documents * 5))
    out = tmp_path / "run"
    rc = main(["train", str(tiny_model_folder), str(text_file), "--hookpoints", "model.layers.1",
               "--tokens", "2048", "--batch-size", "256", "--expansion", "2", "-k", "4",
               "--ctx-len", "32", "--eval-tokens", "128", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "model.layers.1" / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(4.0) and 0 <= metrics["fvu"] < 1.5
    assert (out / "model.layers.1" / "density.png").stat().st_size > 1000
    assert main(["eval", str(out), "--tokens", "64", "--ctx-len", "32", "--no-splice"]) == 0
    assert main(["refit", str(out / "model.layers.1"), "--tokens", "512", "--eval-tokens", "0"]) == 0
    refit = json.loads((out / "model.layers.1-refit" / "refit.json").read_text())
    assert refit["gain_min"] == refit["gain_max"] > 0  # top-k: one common gain
    assert main(["train", str(tiny_model_folder), str(text_file), "--tokens", "2048",
                 "--batch-size", "256", "-k", "5", "--ctx-len", "32", "--out", str(out)]) == 2


def test_cli_info_lists_every_hookpoint_with_its_width(tiny_model_folder, capsys):
    assert main(["info", "--model", str(tiny_model_folder)]) == 0
    lines = dict(line.rsplit(None, 1) if not line.endswith(")") else (line.split()[0], "-")
                 for line in capsys.readouterr().out.splitlines() if line.strip())
    assert lines["model.layers.1"] == "32" and lines["model.layers.1.mlp.down_proj"] == "32"
    assert lines["model.layers.1.mlp.up_proj"] == "64"


def test_loaded_batchtopk_uses_its_inference_threshold(tmp_path):
    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=16, n_features=64, activation="batchtopk", k=4))
    x = torch.randn(512, 16)
    with torch.no_grad():
        for _ in range(20):
            coder.train()(x)  # settle the threshold
    coder.save(str(tmp_path / "c"))
    from monosemantic.coders import load_coder

    loaded = load_coder(tmp_path / "c")
    assert not loaded.training
    with torch.no_grad():
        before = loaded.threshold.clone()
        acts = loaded(x).acts
        pre = loaded.encode(x).pre_acts
    assert torch.equal(loaded.threshold, before)  # evaluation does not move the threshold
    assert torch.equal(acts, pre * (pre > before))  # the fixed-threshold rule, not batch top-k
