"""Hookpoints: read and rewrite any module of an HF model, addressed by its module name.

A hookpoint is an HF module path such as `model.layers.12.mlp`, optionally suffixed with
`:input` or `:output` (the default). Patterns are shell globs over module names
(`model.layers.*.mlp`), expanded in the model's own module order.

Capture and patch are context managers that always remove their hooks. `run_to_hookpoints` runs
the forward pass only as far as it needs: once every requested hookpoint has fired, the last hook
raises `StopForward`, so the layers after the deepest hookpoint never run.
"""

from __future__ import annotations

import difflib
import fnmatch
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

SIDES = ("input", "output")


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once every hookpoint it needs has fired."""


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: a module name and which side of the module to read."""

    module: str
    side: str = "output"

    @classmethod
    def parse(cls, text: str) -> "Hookpoint":
        name, _, side = text.partition(":")
        side = side or "output"
        if side not in SIDES:
            raise ValueError(f"hookpoint {text!r}: the part after ':' must be one of {SIDES}, "
                             f"got {side!r}. Example: 'model.layers.3.mlp:input'.")
        return cls(name, side)

    def __str__(self) -> str:
        return self.module if self.side == "output" else f"{self.module}:{self.side}"


def resolve_hookpoints(model: nn.Module, patterns: list[str] | str) -> list[str]:
    """Expand glob patterns into hookpoint names, in the model's module order, without repeats.

    Raises `ValueError` naming the close matches when a pattern matches no module.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    # containers (ModuleList, ModuleDict) have no forward of their own, so nothing would fire
    names = [n for n, m in model.named_modules()
             if n and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    out: list[str] = []
    for pattern in patterns:
        hp = Hookpoint.parse(pattern)
        matched = [n for n in names if fnmatch.fnmatchcase(n, hp.module)]
        if not matched:
            close = difflib.get_close_matches(hp.module, names, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            layer_like = [n for n in names if n.count(".") <= 2][:8]
            raise ValueError(
                f"hookpoint {pattern!r} matches no module of {type(model).__name__}.{hint} "
                f"Hookpoints are HF module names (e.g. {', '.join(layer_like)}); "
                f"list them all with `monosemantic info --model MODEL`.")
        for n in matched:
            name = str(Hookpoint(n, hp.side))
            if name not in out:
                out.append(name)
    return out


def _first_tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict) and value:  # an HF ModelOutput: its first field (last_hidden_state)
        value = tuple(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"hooked value of type {type(value).__name__} holds no tensor to read")


def _replace_first(value, new: Tensor):
    if isinstance(value, Tensor):
        return new
    if isinstance(value, dict):
        value[next(iter(value))] = new  # ModelOutput.__setitem__ updates the attribute too
        return value
    return (new, *value[1:]) if isinstance(value, tuple) else [new, *value[1:]]


def _register(model: nn.Module, hookpoint: str, fn: Callable[[Tensor], Tensor | None]):
    """Register `fn` on a hookpoint. `fn(tensor)` may return a replacement tensor."""
    hp = Hookpoint.parse(hookpoint)
    try:
        module = model.get_submodule(hp.module)
    except AttributeError:
        resolve_hookpoints(model, hookpoint)  # raises, naming the close matches
        raise
    if hp.side == "output":
        def out_hook(mod, args, output):
            new = fn(_first_tensor(output))
            return None if new is None else _replace_first(output, new)
        return module.register_forward_hook(out_hook)

    def in_hook(mod, args, kwargs):
        if args:
            new = fn(_first_tensor(args))
            return None if new is None else (_replace_first(args, new), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})
    return module.register_forward_pre_hook(in_hook, with_kwargs=True)


@contextmanager
def hooks(model: nn.Module, fns: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
    """Register one function per hookpoint for the duration of the block; always removed.

    The functions act only on forward passes run by the thread that registered them, so that
    threads can run the same model at once, each with its own hooks (the CPU harvest's
    streams, `data.activations.harvest_batch`)."""
    owner = threading.get_ident()

    def own(fn: Callable[[Tensor], Tensor | None]) -> Callable[[Tensor], Tensor | None]:
        return lambda t: fn(t) if threading.get_ident() == owner else None

    handles = []
    try:
        for hookpoint, fn in fns.items():
            handles.append(_register(model, hookpoint, own(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: nn.Module, hookpoints: list[str], stop: bool = False,
            detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record the tensor at each hookpoint into the yielded dict ([B, T, D] for the usual module).

    With `stop=True` the forward pass ends (by `StopForward`, which the caller catches; see
    `run_to_hookpoints`) as soon as every hookpoint has been recorded.
    """
    acts: dict[str, Tensor] = {}
    wanted = set(hookpoints)

    def make(name: str):
        def fn(t: Tensor) -> None:
            acts[name] = t.detach() if detach else t
            if stop and wanted.issubset(acts):
                raise StopForward
        return fn

    with hooks(model, {h: make(h) for h in hookpoints}):
        yield acts


@contextmanager
def patch(model: nn.Module, fns: dict[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Replace the tensor at each hookpoint by `fn(tensor)` for the duration of the block."""
    with hooks(model, fns):
        yield


def run_to_hookpoints(model: nn.Module, input_ids: Tensor, hookpoints: list[str],
                      attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Run `model` on `input_ids` only as far as the deepest hookpoint; return each one's tensor."""
    with capture(model, hookpoints, stop=True) as acts:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    missing = [h for h in hookpoints if h not in acts]
    if missing:
        raise RuntimeError(f"hookpoints {missing} never fired in a forward pass of "
                           f"{type(model).__name__}; is the module used by forward()?")
    return acts


@torch.no_grad()
def hookpoint_widths(model: nn.Module, hookpoints: list[str], strict: bool = True) -> dict[str, int]:
    """The last dimension of each hookpoint's tensor, read off a one-token forward pass.

    With `strict=False`, hookpoints that never fire or hold no tensor get width 0 instead of an
    error (used to list every module of a model)."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    if strict:
        acts = run_to_hookpoints(model, ids, hookpoints)
        return {h: int(acts[h].shape[-1]) for h in hookpoints}
    widths = dict.fromkeys(hookpoints, 0)
    handles = []

    def make(name: str, hp: Hookpoint):
        def read(value) -> None:
            try:
                widths[name] = int(_first_tensor(value).shape[-1])
            except (TypeError, IndexError):
                pass
        if hp.side == "output":
            return lambda mod, args, output: read(output)
        return lambda mod, args: read(args)

    try:
        for h in hookpoints:
            hp = Hookpoint.parse(h)
            module = model.get_submodule(hp.module)
            hook = make(h, hp)
            handles.append(module.register_forward_hook(hook) if hp.side == "output"
                           else module.register_forward_pre_hook(hook))
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return widths
