"""Checkpoints: every coder's weights, optimizer state and dead-feature counters in ONE
safetensors file (so all coders of a run are always at the same step), with the scalar state as
JSON in the file's metadata. Written atomically; never unpickled.

A layer-distributed run (train/distributed.py) adds part files written by the other ranks before
rank 0 writes the main file, which names them in its state ("parts"); `load_checkpoint` merges them,
so callers see one checkpoint whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..utils import atomic_save_safetensors

FORMAT = "monosemantic.checkpoint/1"


def pack_optimizer(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}/optim/{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unpack_optimizer(prefix: str, tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    head = f"{prefix}/optim/"
    for name, value in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head):].split("/", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, tensors: dict[str, Tensor], state: dict) -> None:
    atomic_save_safetensors(path, tensors, metadata={"format": FORMAT, "state": json.dumps(state)})


def load_checkpoint(path: Path, names: list[str] | None = None) -> tuple[dict[str, Tensor], dict]:
    """(tensors, state) of the checkpoint at `path`, with the part files it names (written by the
    other ranks of a layer-distributed run) merged in. `names`: only these coders' tensors."""
    tensors, state = _load_one(path, names)
    for part in state.pop("parts", []):
        more, theirs = _load_one(path.parent / part, names)
        if theirs["step"] != state["step"]:
            raise ValueError(f"checkpoint part {part} is from step {theirs['step']}, not "
                             f"{state['step']}; the checkpoint is inconsistent")
        tensors.update(more)
        state["coders"].update(theirs["coders"])
    return tensors, state


def _load_one(path: Path, names: list[str] | None) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    heads = None if names is None else tuple(f"{n}/" for n in names)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if heads is None or k.startswith(heads)}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({err}); delete it to start "
                         "the run over, or restore it from a backup") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a monosemantic checkpoint (format {meta.get('format')!r})")
    return tensors, json.loads(meta["state"])
