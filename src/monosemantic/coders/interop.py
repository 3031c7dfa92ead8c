"""Interop: read and write coders in the folder layouts of eai-sparsify and SAELens.

Shapes: D_in input width, D_out output width, F features.

    coder = load_any("runs/peer/layers.15")                  # ours, sparsify's or SAELens' folder
    coder = load_any("EleutherAI/sae-pythia-70m-32k", hookpoint="layers.3")    # HF hub, online
    save_sparsify(coder, "out/layers.15"); save_saelens(coder, "out/blocks.15.hook_resid_post")

Layouts (detected from the file names next to cfg.json):
  ours      cfg.json (+ "format") and coder.safetensors                           (coders.io)
  sparsify  cfg.json {d_in, k, num_latents, transcode, skip_connection, activation, ...} and
            sae.safetensors {encoder.weight [F, D_in], encoder.bias [F], W_dec [F, D_in],
            b_dec [D_in], W_skip [D_in, D_in]?}; one such folder per hookpoint, named after it.
            Forward: acts = topk(relu((x - b_dec) @ W_enc.T + b_enc)) (x itself for a transcoder),
            out = acts @ W_dec + b_dec (+ x @ W_skip.T). (sparsify 1.3.3, sparse_coder.py.)
  SAELens   cfg.json {architecture, d_in, d_sae, apply_b_dec_to_input, normalize_activations,
            k?, d_out?, metadata{hook_name, sae_lens_version, ...}} and sae_weights.safetensors
            {W_enc [D_in, F], b_enc [F], W_dec [F, D_out], b_dec [D_out], threshold [F] (older:
            log_threshold), gated: b_gate/r_mag/b_mag, W_skip [D_out, D_in]}. (SAELens 6.54.)

Loading rewrites the peer's forward in our form exactly, folding in float64:
  1. apply_b_dec_to_input=False (SAELens): b_enc += W_enc @ b_dec, since our SAE centres x on b_dec;
  2. rescale_acts_by_decoder_norm (SAELens topk): the decoder norms n go into the encoder
     (W_enc, b_enc times n, W_dec / n), as SAELens itself folds them when saving;
  3. normalize_activations="expected_average_only_in": the constant input scale s (from the
     argument or activation_scaler.json beside the weights) is folded as SAELens does (W_enc * s,
     W_dec / s, b_dec / s); per-token normalisations cannot be folded and are refused;
  4. decoder rows that are not unit norm are folded into the encoder with `fold_decoder_norms`
     where that leaves outputs unchanged (relu, jumprelu, gated); a top-k selection compares
     features, so top-k coders keep their decoder norms as they are (still exact);
  5. a sparsify SAE with a skip connection becomes a skip transcoder reading and writing the same
     hookpoint, with the centring folded into b_enc.
Anything that cannot be represented exactly (groupmax, per-token normalisation, other SAELens
architectures) raises a ValueError saying what is unsupported. Files are safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from monosemantic.coders.base import SparseCoder
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.io import CFG_FILE, WEIGHTS_FILE, build_coder, load_coder
from monosemantic.utils import atomic_save_safetensors, atomic_write_json, read_json

logger = logging.getLogger(__name__)

SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"
SAELENS_VERSION = "6.54.12"
"""The SAELens release whose cfg.json conventions `save_saelens` writes."""
LAYOUTS = {"monosemantic": WEIGHTS_FILE, "sparsify": SPARSIFY_WEIGHTS, "saelens": SAELENS_WEIGHTS}
SAELENS_ARCH = {  # architecture -> (our activation, our kind)
    "standard": ("relu", "sae"), "topk": ("topk", "sae"), "jumprelu": ("jumprelu", "sae"),
    "gated": ("gated", "sae"), "transcoder": ("relu", "transcoder"),
    "skip_transcoder": ("relu", "skip_transcoder"),
    "jumprelu_transcoder": ("jumprelu", "transcoder"),
    "jumprelu_skip_transcoder": ("jumprelu", "skip_transcoder"),
    "batchtopk": ("batchtopk", "sae"),  # a training checkpoint (save_model); inference is jumprelu
}
PER_FEATURE_SCALES = ("relu", "jumprelu", "gated")
"""Architectures whose features can be rescaled one by one without changing outputs."""


# ---- layouts and the dispatcher ---------------------------------------------------------------

def detect_layout(folder: str | Path) -> str:
    """"monosemantic", "sparsify" or "saelens", from the files in `folder`; a ValueError naming
    the files found (and the hookpoint subfolders, for a folder holding several coders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"coder folder {folder} does not exist")
    found = [name for name, weights in LAYOUTS.items()
             if (folder / CFG_FILE).is_file() and (folder / weights).is_file()]
    if found:
        return found[0]
    subs = sorted(p.parent.name for p in folder.glob(f"*/{CFG_FILE}"))
    if subs:
        raise ValueError(f"{folder} holds one coder per hookpoint ({', '.join(subs)}); pass "
                         "hookpoint=NAME (or the subfolder itself) to pick one")
    files = sorted(p.name for p in folder.iterdir())[:12]
    raise ValueError(f"{folder} is not a coder folder: expected cfg.json with coder.safetensors "
                     f"(monosemantic), sae.safetensors (eai-sparsify) or sae_weights.safetensors "
                     f"(SAELens); found {files or 'nothing'}")


def load_any(path_or_repo: str | Path, hookpoint: str | None = None,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
             norm_scaling_factor: float | None = None) -> SparseCoder:
    """Load a coder from a folder in any known layout, or from an HF hub repo id (downloaded with
    `huggingface_hub.snapshot_download`; only the `hookpoint` subfolder when one is given). A repo
    or folder holding one coder per hookpoint (sparsify's, SAELens releases) needs `hookpoint`."""
    path = Path(path_or_repo)
    if not path.exists():
        path = download(str(path_or_repo), hookpoint)
    folder = path / hookpoint if hookpoint else path
    if hookpoint and not folder.is_dir():
        subs = sorted(p.parent.name for p in path.glob(f"*/{CFG_FILE}"))
        raise FileNotFoundError(f"{path} has no coder for hookpoint {hookpoint!r}; it has "
                                f"{', '.join(subs) or 'no hookpoint subfolders'}")
    layout = detect_layout(folder)
    if layout == "sparsify":
        return load_sparsify(folder, device=device, dtype=dtype)
    if layout == "saelens":
        return load_saelens(folder, device=device, dtype=dtype,
                            norm_scaling_factor=norm_scaling_factor)
    return load_coder(folder, device=device)


def download(repo: str, hookpoint: str | None = None) -> Path:
    """The local snapshot of HF hub repo `repo` (only its `hookpoint` subfolder when given)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise FileNotFoundError(f"{repo} is neither a folder nor an HF hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError("loading from the HF hub needs huggingface_hub: "
                          "pip install huggingface_hub") from err
    patterns = [f"{hookpoint}/*"] if hookpoint else None
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated repo: say which and why
        raise ValueError(f"{repo} is not a local folder, and downloading it as HF hub repo "
                         f"{repo!r}{f' (hookpoint {hookpoint})' if hookpoint else ''} failed: "
                         f"{type(err).__name__}: {str(err)[:300]}. Check the path or repo id and "
                         "the network, or download the folder elsewhere and pass its path") from err


def match_hookpoint(name: str, model: nn.Module) -> str:
    """The HF module name of a peer's hookpoint in `model`: names relative to the base model
    (sparsify's "layers.15" -> "model.layers.15") and TransformerLens residual-stream names
    (SAELens' "blocks.15.hook_resid_post" -> "model.layers.15", hook_resid_pre -> ":input").
    TransformerLens may process weights (centring, folded LayerNorm), so a TL-trained coder
    can see slightly different activations on the HF model."""
    modules = dict(model.named_modules())
    base, _, side = name.partition(":")
    if base in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and f"{prefix}.{base}" in modules:
        return f"{prefix}.{name}"
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)", base)
    stacks = [n for n, mod in modules.items() if isinstance(mod, nn.ModuleList)]
    if m and stacks:
        layer = f"{stacks[0]}.{m[1]}"
        if m[2] == "resid_post" and layer in modules:
            return layer
        if m[2] == "resid_pre" and layer in modules:
            return f"{layer}:input"
        for child in (("mlp",) if m[2] == "mlp_out" else ("self_attn", "attn")):
            if f"{layer}.{child}" in modules:
                return f"{layer}.{child}"
    raise ValueError(f"the coder's hookpoint {name!r} is not a module of {type(model).__name__}; "
                     "list the model's hookpoints with `monosemantic info --model MODEL`")


def adapt_hookpoints(coder: SparseCoder, model: nn.Module) -> SparseCoder:
    """`coder` with its hookpoint names (metadata) renamed to `model`'s by `match_hookpoint`;
    empty names are left empty."""
    c = coder.cfg
    new = {k: match_hookpoint(v, model) for k, v in
           (("hookpoint", c.hookpoint), ("out_hookpoint", c.out_hookpoint)) if v}
    if any(new[k] != getattr(c, k) for k in new):
        logger.info("coder hookpoints %s -> %s", {k: getattr(c, k) for k in new}, new)
        coder.cfg = dataclasses.replace(c, **new)
    return coder


# ---- eai-sparsify ----------------------------------------------------------------------------

def load_sparsify(folder: str | Path, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32, hookpoint: str | None = None) -> SparseCoder:
    """A coder saved by eai-sparsify (`SparseCoder.save_to_disk`); `hookpoint` (metadata)
    defaults to the folder name, which is how sparsify names hookpoint folders."""
    folder = Path(folder)
    cfg = _read_peer_cfg(folder, "eai-sparsify")
    t = _read_peer_tensors(folder / SPARSIFY_WEIGHTS)
    known = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"}
    _expect_keys(folder / SPARSIFY_WEIGHTS, t, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, known)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise ValueError(f"{folder}: sparsify activation {act!r} is not supported (only 'topk'; "
                         "groupmax picks one feature per group, which no monosemantic coder does)")
    if cfg.get("signed"):
        raise ValueError(f"{folder}: signed sparsify coders (negative activations) are not supported")
    W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"]
    n_feat, d_in = W_enc.shape
    if "d_in" in cfg and cfg["d_in"] != d_in:
        raise ValueError(f"{folder}: cfg.json says d_in={cfg['d_in']} but encoder.weight is "
                         f"{tuple(W_enc.shape)}; the two files do not belong together")
    _check_shapes(folder, {"encoder.bias": (b_enc, (n_feat,)), "W_dec": (W_dec, (n_feat, d_in)),
                           "b_dec": (b_dec, (d_in,))})
    transcode, skip = bool(cfg.get("transcode", False)), "W_skip" in t
    if skip != bool(cfg.get("skip_connection", False)):
        raise ValueError(f"{folder}: cfg.json skip_connection={cfg.get('skip_connection')} but "
                         f"{SPARSIFY_WEIGHTS} {'has' if skip else 'lacks'} W_skip")
    if skip:
        _check_shapes(folder, {"W_skip": (t["W_skip"], (d_in, d_in))})
    if skip and not transcode:  # an SAE with a skip path: fold the centring, keep x for the skip
        b_enc = b_enc - W_enc @ b_dec
    kind = "skip_transcoder" if skip else ("transcoder" if transcode else "sae")
    name = folder.name if hookpoint is None else hookpoint
    ccfg = CoderConfig(d_in=d_in, n_features=n_feat, kind=kind, activation="topk", k=int(cfg["k"]),
                       hookpoint=f"{name}:input" if transcode else name,  # sparsify hooks a module:
                       out_hookpoint=name if kind != "sae" else "")  # transcoders read its input
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if skip:
        params["W_skip"] = t["W_skip"]
    return _build(ccfg, params, device, dtype)


def save_sparsify(coder: SparseCoder, folder: str | Path) -> None:
    """Write `coder` as eai-sparsify's `SparseCoder.save_to_disk` does (cfg.json + sae.safetensors).
    Only top-k coders whose output width equals their input width fit that layout."""
    c = coder.cfg
    if c.activation != "topk":
        raise ValueError(f"sparsify stores only top-k coders; this one is {c.activation!r} "
                         "(save it with save_saelens, which also holds batchtopk as jumprelu)")
    if c.d_output != c.d_in:
        raise ValueError(f"sparsify coders map D_in to D_in; this {c.kind} has d_in={c.d_in}, "
                         f"d_out={c.d_output}")
    W_dec = coder.W_dec.detach()
    unit = bool(((W_dec.norm(dim=1) - 1).abs() < 1e-4).all())
    cfg = {"activation": "topk", "expansion_factor": max(1, c.n_features // c.d_in),
           "normalize_decoder": unit, "num_latents": c.n_features, "k": c.k, "multi_topk": False,
           "skip_connection": c.kind == "skip_transcoder", "transcode": c.kind != "sae", "d_in": c.d_in}
    tensors = {"encoder.weight": coder.W_enc, "encoder.bias": coder.b_enc, "W_dec": W_dec,
               "b_dec": coder.b_dec}
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / SPARSIFY_WEIGHTS, tensors, {"format": "pt"})
    atomic_write_json(folder / CFG_FILE, cfg)


# ---- SAELens ---------------------------------------------------------------------------------

def load_saelens(folder: str | Path, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32,
                 norm_scaling_factor: float | None = None) -> SparseCoder:
    """A coder saved by SAELens (`save_model` / `save_inference_model`, cfg.json +
    sae_weights.safetensors). `norm_scaling_factor` is needed only for
    normalize_activations="expected_average_only_in" without an activation_scaler.json beside."""
    folder = Path(folder)
    cfg = _saelens_cfg(_read_peer_cfg(folder, "SAELens"), folder)
    arch = cfg["architecture"]
    if arch not in SAELENS_ARCH:
        raise ValueError(f"{folder}: SAELens architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SAELENS_ARCH)}")
    activation, kind = SAELENS_ARCH[arch]
    t = _read_peer_tensors(folder / SAELENS_WEIGHTS)
    if "log_threshold" in t:  # older JumpReLU checkpoints, converted as SAELens does
        t["threshold"] = t.pop("log_threshold").exp()
    scaling = t.pop("scaling_factor", None)  # pre-6.0 finetuning scale of the activations
    need = {"W_enc", "W_dec", "b_dec"}
    need |= {"b_gate", "r_mag", "b_mag"} if activation == "gated" else {"b_enc"}
    need |= {"threshold"} if activation == "jumprelu" else set()
    need |= {"topk_threshold"} if activation == "batchtopk" else set()
    need |= {"W_skip"} if kind == "skip_transcoder" else set()
    _expect_keys(folder / SAELENS_WEIGHTS, t, need, need)
    W_enc = t["W_enc"].T  # ours is [F, D_in]
    n_feat, d_in = W_enc.shape
    d_out = t["b_dec"].shape[0]
    shapes = {"W_dec": (t["W_dec"], (n_feat, d_out))}
    shapes.update({k: (t[k], (n_feat,)) for k in ("b_enc", "b_gate", "r_mag", "b_mag", "threshold")
                   if k in t})
    if "W_skip" in t:
        shapes["W_skip"] = (t["W_skip"], (d_out, d_in))
    _check_shapes(folder, shapes)
    if (cfg["d_in"], cfg["d_sae"]) != (d_in, n_feat):
        raise ValueError(f"{folder}: cfg.json says d_in={cfg['d_in']}, d_sae={cfg['d_sae']} but "
                         f"W_enc is {tuple(t['W_enc'].shape)}")
    b_enc = t["b_gate"] if activation == "gated" else t["b_enc"]
    W_dec, b_dec = t["W_dec"], t["b_dec"]
    b_mag = t.get("b_mag")
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        W_dec = W_dec * scaling[:, None]  # old SAELens decoded (acts * scaling) @ W_dec
    if kind == "sae" and not cfg["apply_b_dec_to_input"]:  # step 1: we centre x on b_dec
        shift = W_enc @ b_dec
        b_enc = b_enc + shift
        if b_mag is not None:
            b_mag = b_mag + t["r_mag"].exp() * shift
    if kind != "sae" and cfg["apply_b_dec_to_input"]:
        raise ValueError(f"{folder}: a transcoder with apply_b_dec_to_input=True is not valid SAELens")
    if activation in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):  # step 2
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    scale = _saelens_scale(cfg, folder, norm_scaling_factor)  # step 3
    if scale != 1.0:  # out = f(s x) / s; a skip path W_skip (s x) / s needs no change
        W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale
    meta = cfg.get("metadata") or {}
    hook = meta.get("hf_hook_name") or meta.get("hook_name") or ""
    hook_out = meta.get("hf_hook_name_out") or meta.get("hook_name_out") or (hook if kind != "sae" else "")
    ccfg = CoderConfig(d_in=d_in, n_features=n_feat, kind=kind, d_out=d_out if kind != "sae" else None,
                       activation=activation,
                       k=round(cfg.get("k", 100)) if activation in ("topk", "batchtopk") else None,
                       hookpoint=hook or "", out_hookpoint=hook_out if kind != "sae" else "")
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if activation == "jumprelu":  # SAELens: relu(h) * (h > theta) == h * (h > max(theta, 0))
        params["threshold"] = t["threshold"].clamp_min(0)
    if activation == "gated":
        params.update(r_mag=t["r_mag"], b_mag=b_mag)
    if activation == "batchtopk":  # in units of the (folded) pre-activations, as ours
        params["threshold"] = t["topk_threshold"].reshape(())
    if "W_skip" in t:
        params["W_skip"] = t["W_skip"]
    return _build(ccfg, params, device, dtype)


def _saelens_cfg(cfg: dict, folder: Path) -> dict:
    """cfg.json with SAELens' pre-6.0 defaults applied (loading.handle_pre_6_0_config)."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version or int(re.match(r"\d+", str(version))[0]) < 6:
        cfg = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v
               for k, v in cfg.items()}
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("architecture", "standard")
        fn = cfg.get("activation_fn") or "relu"
        if fn == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
        elif fn != "relu":
            raise ValueError(f"{folder}: SAELens activation_fn {fn!r} is not supported (relu, topk)")
        norm = cfg.get("normalize_activations")
        cfg["normalize_activations"] = ("expected_average_only_in" if norm is True else
                                        "none" if norm in (None, False) else norm)
        cfg.setdefault("metadata", {"hook_name": cfg.get("hook_name", "")})
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{folder / CFG_FILE} has no integer {key!r}; it is not a SAELens config")
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("normalize_activations", "none")
    cfg.setdefault("architecture", "standard")
    return cfg


def _saelens_scale(cfg: dict, folder: Path, given: float | None) -> float:
    mode = cfg["normalize_activations"]
    if mode == "none":
        return 1.0
    if mode == "expected_average_only_in":
        if given is None and (folder / SAELENS_SCALER).is_file():
            given = read_json(folder / SAELENS_SCALER).get("scaling_factor")
        if given is None or not math.isfinite(given) or given <= 0:
            raise ValueError(f"{folder}: normalize_activations='expected_average_only_in' means the "
                             "weights expect inputs times a constant that this folder does not hold; "
                             "pass norm_scaling_factor= (SAELens' pretrained directory lists it)")
        return float(given)
    raise ValueError(f"{folder}: normalize_activations={mode!r} is not supported: a per-token or "
                     "whitening normalisation is not a constant that folds into the weights "
                     "(fold whitening with SAELens' fold_activation_whitening first)")


def save_saelens(coder: SparseCoder, folder: str | Path) -> None:
    """Write `coder` as SAELens' `save_model` does (cfg.json in the 6.x inference format +
    sae_weights.safetensors). batchtopk is saved as jumprelu with one shared threshold, as
    SAELens saves its own BatchTopK SAEs."""
    c = coder.cfg
    act, kind = c.activation, c.kind
    if act == "batchtopk":
        if float(coder.threshold) < 0:
            raise ValueError("this batchtopk coder has no calibrated threshold (it never ran a "
                             "training batch); SAELens stores batchtopk as jumprelu with that threshold")
        theta = torch.full_like(coder.b_enc, float(coder.threshold))
        act = "jumprelu"
    elif act == "jumprelu":
        theta = coder.theta().detach()
    arch = {ours: arch for arch, ours in SAELENS_ARCH.items() if arch != "batchtopk"}.get((act, kind))
    if arch is None:
        raise ValueError(f"SAELens has no {c.activation} {kind}; its transcoders are relu or jumprelu")
    tensors = {"W_enc": coder.W_enc.T, "W_dec": coder.W_dec, "b_dec": coder.b_dec}
    if act == "gated":
        tensors.update(b_gate=coder.b_enc, r_mag=coder.r_mag, b_mag=coder.b_mag)
    else:
        tensors["b_enc"] = coder.b_enc
    if act == "jumprelu":
        tensors["threshold"] = theta
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "hook_name": c.hookpoint, "hf_hook_name": c.hookpoint, "written_by": "monosemantic"}
    if kind != "sae":
        meta.update(hook_name_out=c.out_hookpoint, hf_hook_name_out=c.out_hookpoint)
    cfg = {"d_in": c.d_in, "d_sae": c.n_features, "dtype": str(coder.dtype).removeprefix("torch."),
           "device": "cpu", "apply_b_dec_to_input": kind == "sae", "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta, "architecture": arch}
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if kind != "sae":
        cfg["d_out"] = c.d_output
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / SAELENS_WEIGHTS, {k: v.detach() for k, v in tensors.items()})
    atomic_write_json(folder / CFG_FILE, cfg)


# ---- shared helpers --------------------------------------------------------------------------

def _read_peer_cfg(folder: Path, peer: str) -> dict:
    path = folder / CFG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {folder} is not a {peer} coder folder")
    try:
        cfg = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-download or re-save the coder") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object; it is not a {peer} config")
    return cfg


def _read_peer_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the coder folder is incomplete")
    try:
        return {k: v.double() for k, v in load_file(path, device="cpu").items()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); re-download or re-save it") from err


def _expect_keys(path: Path, t: dict[str, Tensor], need: set[str], known: set[str]) -> None:
    missing, extra = sorted(need - set(t)), sorted(set(t) - known)
    if missing or extra:
        raise ValueError(f"{path}: missing tensors {missing}, unsupported tensors {extra}; this "
                         "layout or version is not supported")


def _check_shapes(folder: Path, shapes: dict[str, tuple[Tensor, tuple[int, ...]]]) -> None:
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"{shape} from the encoder; the files do not belong together")


def _build(cfg: CoderConfig, params: dict[str, Tensor], device, dtype: torch.dtype) -> SparseCoder:
    """A coder holding `params` (float64 here), decoder norms folded where exact, in `dtype`."""
    coder = build_coder(cfg, dtype=torch.float64)
    with torch.no_grad():
        for name, value in params.items():
            getattr(coder, name).copy_(value)
        norms = coder.W_dec.norm(dim=1)
        if cfg.activation in PER_FEATURE_SCALES and ((norms - 1).abs() > 1e-6).any():
            coder.fold_decoder_norms()
    return coder.to(device=device, dtype=dtype).eval()
