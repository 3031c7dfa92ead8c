"""Coder files: folder/cfg.json (CoderConfig + "format") and folder/coder.safetensors.

Both files are written atomically. Loading never unpickles; every failure names the file and the fix
(a missing folder, a missing, corrupt or truncated file, a config from another format, tensors whose
names or shapes do not match the config).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from monosemantic.coders.base import SparseCoder
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.registry import get
from monosemantic.utils import atomic_save_safetensors, atomic_write_json, read_json

FORMAT = "monosemantic.coder/1"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "coder.safetensors"


def build_coder(cfg: CoderConfig, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> SparseCoder:
    """A fresh coder of the architecture registered as cfg.activation."""
    return get(cfg.activation)(cfg, device=device, dtype=dtype)


def save_coder(coder: SparseCoder, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / WEIGHTS_FILE, dict(coder.state_dict()), {"format": FORMAT})
    atomic_write_json(folder / CFG_FILE, {**coder.cfg.to_dict(), "format": FORMAT})


def _read_cfg(folder: Path) -> CoderConfig:
    path = folder / CFG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {folder} is not a saved coder "
                                "(expected cfg.json and coder.safetensors, written by coder.save)")
    try:
        d = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not valid JSON: {e}); re-save the coder") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} is corrupt: expected a JSON object; re-save the coder")
    fmt = d.pop("format", None)
    if fmt != FORMAT:
        raise ValueError(f"{path} has format={fmt!r}, expected {FORMAT!r}; "
                         "it was not written by this version of monosemantic")
    try:
        return CoderConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} holds an invalid coder config: {e}") from e


def _read_tensors(path: Path, device: torch.device | str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the coder folder is incomplete, re-save it")
    try:
        return load_file(path, device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e}); re-save or re-download the coder") from e


def load_coder(folder: str | Path, device: torch.device | str | None = None) -> SparseCoder:
    """Load a coder saved by `SparseCoder.save` (the class comes from cfg.activation)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"coder folder {folder} does not exist; pass the folder that "
                                "coder.save(folder) wrote (it holds cfg.json and coder.safetensors)")
    cfg = _read_cfg(folder)
    path = folder / WEIGHTS_FILE
    tensors = _read_tensors(path, device)
    if "W_enc" not in tensors:
        raise ValueError(f"{path} has no W_enc tensor; it is not a coder file")
    coder = build_coder(cfg, device=device, dtype=tensors["W_enc"].dtype)
    expected = coder.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not match {folder / CFG_FILE}: missing tensors {missing}, "
                         f"unexpected tensors {extra}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)} but cfg.json implies "
                             f"{tuple(expected[name].shape)}; the two files do not belong together")
    coder.load_state_dict(tensors)
    return coder.eval()  # loaded coders are for inference (batchtopk: its fixed threshold)
