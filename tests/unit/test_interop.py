"""Interop with eai-sparsify and SAELens folder layouts, without either peer installed.

Each peer's folder is written by hand (safetensors + JSON, as the peer's save code writes them),
with non-unit decoder norms and nonzero biases, and our loaded coder is checked against the peer's
forward written out here from its source (sparsify 1.3.3 sparse_coder.py / fused_encoder.py;
SAELens 6.54 saes/*.py). Then our coders are saved in both layouts and re-loaded.

Shapes: B = 20 tokens, D = 6 input width, D_OUT = 5 (transcoders), F = 16 features, K = 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from monosemantic.coders import CoderConfig, build_coder, load_coder
from monosemantic.coders.interop import (detect_layout, load_any, load_saelens, load_sparsify,
                                          match_hookpoint, save_saelens, save_sparsify)

B, D, D_OUT, F, K = 20, 6, 5, 16, 3
TOL = {"atol": 1e-5, "rtol": 1e-5}


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def x_batch(d: int = D, seed: int = 99) -> torch.Tensor:
    return rand(B, d, seed=seed, scale=2.0)


def write(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], weights: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / weights))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


# ---- eai-sparsify ----------------------------------------------------------------------------

def sparsify_tensors(transcode: bool = False, skip: bool = False) -> dict[str, torch.Tensor]:
    t = {"encoder.weight": rand(F, D, seed=1), "encoder.bias": rand(F, seed=2, scale=0.3),
         # rows of norm 0.5..2: not unit, so any wrong folding shows
         "W_dec": rand(F, D, seed=3) * torch.linspace(0.5, 2.0, F)[:, None],
         "b_dec": rand(D, seed=4, scale=0.5)}
    if skip:
        t["W_skip"] = rand(D, D, seed=5, scale=0.2)
    return t


def sparsify_cfg(transcode: bool = False, skip: bool = False, **kw) -> dict:
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": F, "k": K, "multi_topk": False, "skip_connection": skip,
           "transcode": transcode, "d_in": D}
    return {**cfg, **kw}


def sparsify_forward(t: dict[str, torch.Tensor], x: torch.Tensor, transcode: bool) -> torch.Tensor:
    """SparseCoder.forward of sparsify 1.3.3: ReLU, then top-k, then an embedding-bag decoder."""
    h = x if transcode else x - t["b_dec"]
    pre = torch.relu(h @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1, sorted=False)
    out = torch.nn.functional.embedding_bag(idx, t["W_dec"], per_sample_weights=vals, mode="sum")
    out = out + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return out


@pytest.mark.parametrize("transcode,skip", [(False, False), (True, False), (True, True), (False, True)])
def test_sparsify_folder_loads_with_the_peers_outputs(tmp_path, transcode, skip):
    t = sparsify_tensors(transcode, skip)
    folder = write(tmp_path / "layers.3", sparsify_cfg(transcode, skip), t, "sae.safetensors")
    assert detect_layout(folder) == "sparsify"
    coder = load_sparsify(folder)
    x = x_batch()
    torch.testing.assert_close(coder(x).out, sparsify_forward(t, x, transcode), **TOL)
    expect_kind = "skip_transcoder" if skip else ("transcoder" if transcode else "sae")
    assert coder.cfg.kind == expect_kind and coder.cfg.k == K and coder.cfg.activation == "topk"
    assert coder.cfg.hookpoint == ("layers.3:input" if transcode else "layers.3")
    assert (coder(x).acts > 0).sum(-1).max() <= K
    torch.testing.assert_close(load_any(tmp_path, hookpoint="layers.3")(x).out, coder(x).out)


def test_sparsify_round_trip_of_our_topk_is_exact(tmp_path):
    ours = build_coder(CoderConfig(d_in=D, n_features=F, activation="topk", k=K, hookpoint="h"))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(rand(*p.shape, seed=p.numel(), scale=0.2))
    save_sparsify(ours, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "cfg.json").read_text())
    assert cfg["num_latents"] == F and cfg["k"] == K and cfg["d_in"] == D and not cfg["transcode"]
    back = load_sparsify(tmp_path / "h")
    for name, p in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    x = x_batch()
    torch.testing.assert_close(ours(x).out, back(x).out, rtol=0, atol=0)
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "h" / "sae.safetensors"))
    torch.testing.assert_close(sparsify_forward(t, x, False), ours(x).out, **TOL)


def test_sparsify_errors_name_the_problem(tmp_path):
    t = sparsify_tensors()
    bad = write(tmp_path / "g", sparsify_cfg(activation="groupmax"), t, "sae.safetensors")
    with pytest.raises(ValueError, match="groupmax"):
        load_sparsify(bad)
    short = dict(t, W_dec=t["W_dec"][:, :4])
    with pytest.raises(ValueError, match="W_dec has shape"):
        load_sparsify(write(tmp_path / "s", sparsify_cfg(), short, "sae.safetensors"))
    with pytest.raises(ValueError, match="skip_connection"):
        load_sparsify(write(tmp_path / "k", sparsify_cfg(skip=True), t, "sae.safetensors"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(sparsify_cfg()))
    (tmp_path / "t" / "sae.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_sparsify(tmp_path / "t")
    relu = build_coder(CoderConfig(d_in=D, n_features=F, activation="relu"))
    with pytest.raises(ValueError, match="only top-k"):
        save_sparsify(relu, tmp_path / "r")


# ---- SAELens ---------------------------------------------------------------------------------

def saelens_case(arch: str, apply_b_dec: bool = True, rescale: bool = False):
    """(cfg, tensors) of a SAELens folder of architecture `arch`."""
    transcoder = "transcoder" in arch
    d_out = D_OUT if transcoder else D
    t = {"W_enc": rand(D, F, seed=11),
         "W_dec": rand(F, d_out, seed=12) * torch.linspace(0.4, 2.5, F)[:, None],
         "b_dec": rand(d_out, seed=13, scale=0.5)}
    if arch == "gated":
        t.update(b_gate=rand(F, seed=14, scale=0.5), r_mag=rand(F, seed=15, scale=0.3),
                 b_mag=rand(F, seed=16, scale=0.5))
    else:
        t["b_enc"] = rand(F, seed=14, scale=0.5)
    if "jumprelu" in arch:
        t["threshold"] = 0.2 + rand(F, seed=17).abs()
    if "skip" in arch:
        t["W_skip"] = rand(d_out, D, seed=18, scale=0.2)
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec and not transcoder, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": arch,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.2.hook_resid_post"}}
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=rescale)
    if transcoder:
        cfg["d_out"] = d_out
    return cfg, t


def saelens_forward(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAE.forward of SAELens 6.54 for these architectures (encode, then decode)."""
    arch = cfg["architecture"]
    # a transcoder's process_sae_in never subtracts b_dec (it has the output's width)
    sae_in = x if "transcoder" in arch else x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"] > 0).float()
        acts = gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
        return acts @ t["W_dec"] + t["b_dec"]
    h = sae_in @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if arch == "topk":
        if cfg["rescale_acts_by_decoder_norm"]:
            h = h * norms
        vals, idx = h.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(h).scatter(-1, idx, vals.relu())
        if cfg["rescale_acts_by_decoder_norm"]:
            acts = acts / norms
    elif "jumprelu" in arch:
        acts = torch.relu(h) * (h > t["threshold"]).float()
    else:
        acts = torch.relu(h)
    out = acts @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return out


SAELENS_CASES = [("standard", True, False), ("standard", False, False), ("topk", True, False),
                 ("topk", True, True), ("topk", False, True), ("jumprelu", True, False),
                 ("jumprelu", False, False), ("gated", True, False), ("gated", False, False),
                 ("transcoder", False, False), ("skip_transcoder", False, False),
                 ("jumprelu_transcoder", False, False), ("jumprelu_skip_transcoder", False, False)]


@pytest.mark.parametrize("arch,apply_b_dec,rescale", SAELENS_CASES)
def test_saelens_folder_loads_with_the_peers_outputs(tmp_path, arch, apply_b_dec, rescale):
    cfg, t = saelens_case(arch, apply_b_dec, rescale)
    folder = write(tmp_path / "sae", cfg, t, "sae_weights.safetensors")
    assert detect_layout(folder) == "saelens"
    coder = load_any(folder)
    x = x_batch()
    torch.testing.assert_close(coder(x).out, saelens_forward(cfg, t, x), **TOL)
    assert coder.cfg.hookpoint == "blocks.2.hook_resid_post"
    if coder.cfg.activation in ("relu", "jumprelu", "gated"):  # norms folded into the encoder
        torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(F), **TOL)


def test_saelens_scale_folding_and_old_formats(tmp_path):
    x = x_batch()
    cfg, t = saelens_case("topk", rescale=True)
    cfg["normalize_activations"] = "expected_average_only_in"
    folder = write(tmp_path / "scaled", cfg, t, "sae_weights.safetensors")
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        load_saelens(folder)
    expect = saelens_forward(cfg, t, 0.7 * x) / 0.7  # the trainer scales in, and back out
    torch.testing.assert_close(load_saelens(folder, norm_scaling_factor=0.7)(x).out, expect, **TOL)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.7}))
    torch.testing.assert_close(load_saelens(folder)(x).out, expect, **TOL)
    # a JumpReLU checkpoint with log_threshold, and a pre-6.0 config of a standard SAE
    cfg, t = saelens_case("jumprelu")
    old = dict(t)
    old["log_threshold"] = old.pop("threshold").log()
    got = load_saelens(write(tmp_path / "log", cfg, old, "sae_weights.safetensors"))(x).out
    torch.testing.assert_close(got, saelens_forward(cfg, t, x), **TOL)
    cfg, t = saelens_case("standard")
    pre6 = {"d_in": D, "d_sae": F, "hook_point": "blocks.2.hook_resid_pre", "activation_fn_str": "relu",
            "normalize_activations": False, "dtype": "float32"}
    coder = load_saelens(write(tmp_path / "pre6", pre6, t, "sae_weights.safetensors"))
    expect = saelens_forward({**cfg, "apply_b_dec_to_input": True}, t, x)  # the pre-6.0 default
    torch.testing.assert_close(coder(x).out, expect, **TOL)
    assert coder.cfg.hookpoint == "blocks.2.hook_resid_pre"


def test_saelens_refuses_what_it_cannot_represent(tmp_path):
    cfg, t = saelens_case("standard")
    for mode in ("constant_norm_rescale", "layer_norm"):
        folder = write(tmp_path / mode, {**cfg, "normalize_activations": mode}, t, "sae_weights.safetensors")
        with pytest.raises(ValueError, match="per-token"):
            load_saelens(folder)
    with pytest.raises(ValueError, match="matching_pursuit.*not supported"):
        load_saelens(write(tmp_path / "mp", {**cfg, "architecture": "matching_pursuit"}, t,
                           "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="missing tensors \\['threshold'\\]"):
        load_saelens(write(tmp_path / "jr", {**cfg, "architecture": "jumprelu"}, t,
                           "sae_weights.safetensors"))


def our_coder(activation: str, kind: str = "sae"):
    cfg = CoderConfig(d_in=D, n_features=F, kind=kind, d_out=None if kind == "sae" else D_OUT,
                      activation=activation, k=K if activation in ("topk", "batchtopk") else None,
                      hookpoint="model.layers.2", out_hookpoint="" if kind == "sae" else "model.layers.2.mlp")
    coder = build_coder(cfg)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.copy_(0.3 + rand(*p.shape, seed=p.numel(), scale=0.1).abs() if name == "threshold"
                    else p + rand(*p.shape, seed=p.numel() + 1, scale=0.2))
        if activation == "batchtopk":
            coder.threshold.fill_(0.25)
    return coder.eval()


@pytest.mark.parametrize("activation,kind", [("relu", "sae"), ("topk", "sae"), ("batchtopk", "sae"),
                                             ("jumprelu", "sae"), ("gated", "sae"),
                                             ("relu", "transcoder"), ("relu", "skip_transcoder"),
                                             ("jumprelu", "transcoder"), ("jumprelu", "skip_transcoder")])
def test_saelens_round_trip_of_our_coders(tmp_path, activation, kind):
    ours = our_coder(activation, kind)
    save_saelens(ours, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    x = x_batch()
    torch.testing.assert_close(saelens_forward(cfg, t, x), ours(x).out, **TOL)  # the peer agrees
    back = load_saelens(tmp_path / "s")
    torch.testing.assert_close(back(x).out, ours(x).out, **TOL)
    assert back.cfg.hookpoint == "model.layers.2" and back.cfg.kind == kind
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(activation, activation) \
        if kind == "sae" else cfg["architecture"].endswith(kind)


def test_save_saelens_errors(tmp_path):
    with pytest.raises(ValueError, match="no topk transcoder"):
        save_saelens(our_coder("topk", "transcoder"), tmp_path / "a")
    fresh = build_coder(CoderConfig(d_in=D, n_features=F, activation="batchtopk", k=K))
    with pytest.raises(ValueError, match="calibrated threshold"):
        save_saelens(fresh, tmp_path / "b")


# ---- dispatch, hub, hookpoints ---------------------------------------------------------------

def test_load_any_dispatch_and_errors(tmp_path, monkeypatch):
    ours = our_coder("jumprelu")
    ours.save(str(tmp_path / "ours"))
    assert detect_layout(tmp_path / "ours") == "monosemantic"
    x = x_batch()
    torch.testing.assert_close(load_any(tmp_path / "ours")(x).out, load_coder(tmp_path / "ours")(x).out)
    repo = tmp_path / "repo"
    for h in ("layers.1", "layers.2"):
        write(repo / h, sparsify_cfg(), sparsify_tensors(), "sae.safetensors")
    with pytest.raises(ValueError, match="one coder per hookpoint \\(layers.1, layers.2\\)"):
        load_any(repo)
    with pytest.raises(FileNotFoundError, match="no coder for hookpoint 'layers.9'.*layers.1, layers.2"):
        load_any(repo, hookpoint="layers.9")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a coder folder.*notes.txt"):
        load_any(tmp_path / "junk")

    import huggingface_hub
    calls = []

    def fake_download(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        if repo_id == "owner/offline":
            raise OSError("no connection")
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    coder = load_any("owner/sae-repo", hookpoint="layers.2")
    assert calls[-1] == ("owner/sae-repo", ["layers.2/*"]) and coder.cfg.hookpoint == "layers.2"
    with pytest.raises(ValueError, match="as HF hub repo 'owner/offline' failed.*no connection"):
        load_any("owner/offline")
    with pytest.raises(FileNotFoundError, match="neither a folder nor an HF hub repo"):
        load_any("no/such/folder")


def test_match_hookpoint_on_a_tiny_llama(llama):
    model = llama.model
    assert match_hookpoint("model.layers.1", model) == "model.layers.1"
    assert match_hookpoint("layers.1", model) == "model.layers.1"  # sparsify: base-model names
    assert match_hookpoint("layers.1.mlp:input", model) == "model.layers.1.mlp:input"
    assert match_hookpoint("blocks.1.hook_resid_post", model) == "model.layers.1"
    assert match_hookpoint("blocks.1.hook_resid_pre", model) == "model.layers.1:input"
    assert match_hookpoint("blocks.2.hook_mlp_out", model) == "model.layers.2.mlp"
    assert match_hookpoint("blocks.0.hook_attn_out", model) == "model.layers.0.self_attn"
    with pytest.raises(ValueError, match="blocks.7.hook_resid_post.*not a module"):
        match_hookpoint("blocks.7.hook_resid_post", model)


def test_cli_eval_and_refit_read_a_sparsify_folder(tiny_model_folder, documents, tmp_path):
    from monosemantic.cli import main

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(documents * 5))
    width, feats = 32, 64  # the tiny Llama's width
    t = {"encoder.weight": rand(feats, width, seed=1), "encoder.bias": rand(feats, seed=2, scale=0.1),
         "W_dec": rand(feats, width, seed=3, scale=0.2), "b_dec": rand(width, seed=4, scale=0.1)}
    folder = write(tmp_path / "peer" / "layers.1", {**sparsify_cfg(), "num_latents": feats, "d_in": width},
                   t, "sae.safetensors")  # sparsify names hookpoints inside the base model
    common = ["--model", str(tiny_model_folder), "--corpus", str(text)]
    assert main(["eval", str(tmp_path / "peer"), "--tokens", "64", "--ctx-len", "32", "--no-splice",
                 *common]) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["l0"] <= K and metrics["fvu"] > 0
    assert main(["refit", str(folder), "--tokens", "256", "--eval-tokens", "0", *common]) == 0
    refit = load_coder(tmp_path / "peer" / "layers.1-refit")  # saved in our layout
    assert refit.cfg.hookpoint == "model.layers.1" and refit.cfg.k == K
