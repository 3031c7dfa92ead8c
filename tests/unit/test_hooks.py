"""Hookpoints on tiny Llama and GPT-2 models: capture, patch, early stop, cleanup, resolution.

Shapes: B = 2 contexts, T = 7 tokens, D = 32 model width (64 inside the MLP).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DOWN_PROJ, LAYER
from monosemantic.hooks import (StopForward, capture, hookpoint_widths, patch, resolve_hookpoints,
                                run_to_hookpoints)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(seed))


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_capture_equals_hidden_states(lm, family):
    model, x = lm.model, ids()
    layer1, layer2 = LAYER[family].format(1), LAYER[family].format(2)
    with capture(model, [layer1, f"{layer2}:input"]) as acts:
        out = model(input_ids=x, output_hidden_states=True)
    # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i
    assert acts[layer1].shape == (2, 7, 32)
    assert torch.equal(acts[layer1], out.hidden_states[2])
    assert torch.equal(acts[f"{layer2}:input"], acts[layer1])


@torch.no_grad()
def test_identity_patch_is_exact_and_zero_patch_is_not(lm, family):
    model, x = lm.model, ids()
    h = LAYER[family].format(1)
    base = model(input_ids=x).logits
    with patch(model, {h: lambda t: t}):
        same = model(input_ids=x).logits
    with patch(model, {h: torch.zeros_like}):
        zeroed = model(input_ids=x).logits
    with patch(model, {f"{h}:input": lambda t: t}):
        same_in = model(input_ids=x).logits
    assert torch.equal(same, base) and torch.equal(same_in, base)
    assert (zeroed - base).abs().max() > 1e-3
    assert torch.equal(model(input_ids=x).logits, base)  # the patch is gone after the block


@torch.no_grad()
def test_run_to_hookpoints_matches_full_forward_and_stops(lm, family):
    model, x = lm.model, ids(1)
    wanted = [LAYER[family].format(0), DOWN_PROJ[family].format(1) + ":input"]
    with capture(model, wanted) as full:
        model(input_ids=x)
    fired = []
    later = model.get_submodule(LAYER[family].format(2))
    handles = [later.register_forward_hook(lambda *a: fired.append("layer 2")),
               model.lm_head.register_forward_hook(lambda *a: fired.append("lm_head"))]
    try:
        early = run_to_hookpoints(model, x, wanted)
    finally:
        for handle in handles:
            handle.remove()
    assert fired == []
    for h in wanted:
        assert torch.equal(early[h], full[h])
    assert n_hooks(model) == 0


def test_hooks_removed_even_when_the_block_raises(llama):
    model, h = llama.model, "model.layers.1"
    assert n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, [h, "model.layers.0.mlp:input"]):
            assert n_hooks(model) == 2
            raise RuntimeError("boom")
    with pytest.raises(KeyError):
        with patch(model, {h: torch.zeros_like}):
            raise KeyError("inside")
    assert n_hooks(model) == 0


def test_hooks_removed_when_registration_fails_half_way(llama):
    with pytest.raises(ValueError, match="model.nope"):
        with patch(llama.model, {"model.layers.0": torch.zeros_like, "model.nope": torch.zeros_like}):
            pass
    assert n_hooks(llama.model) == 0


def test_unknown_hookpoint_lists_close_matches(llama):
    with pytest.raises(ValueError, match=r"model\.layers\.1\b.*monosemantic info") as err:
        resolve_hookpoints(llama.model, "model.layer.1")
    assert "Close matches" in str(err.value)
    with pytest.raises(ValueError, match="after ':'"):
        resolve_hookpoints(llama.model, "model.layers.1:inptu")
    with pytest.raises(ValueError, match=r"'model\.layers\.15' matches no module"):  # hooked directly
        with capture(llama.model, ["model.layers.15"]):
            pass


def test_globs_expand_in_module_order_without_repeats(llama):
    got = resolve_hookpoints(llama.model, ["model.layers.*.mlp", "model.layers.1.mlp",
                                           "model.layers.?.mlp.down_proj:input"])
    assert got == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp",
                   "model.layers.0.mlp.down_proj:input", "model.layers.1.mlp.down_proj:input",
                   "model.layers.2.mlp.down_proj:input"]


def test_hookpoint_widths(lm, family):
    down = DOWN_PROJ[family].format(1)
    hps = [LAYER[family].format(0), f"{down}:input", down]
    assert hookpoint_widths(lm.model, hps) == {hps[0]: 32, hps[1]: 64 if family == "llama" else 128,
                                               hps[2]: 32}


@torch.no_grad()
def test_a_module_returning_a_model_output_can_be_read_and_patched(lm, family):
    """The decoder stack (`model` / `transformer`) returns a ModelOutput, not a tensor or tuple."""
    model, x = lm.model, ids(2)
    stack = "model" if family == "llama" else "transformer"
    out = model(input_ids=x, output_hidden_states=True)
    assert hookpoint_widths(model, [stack]) == {stack: 32}
    with capture(model, [stack]) as acts:
        model(input_ids=x)
    assert torch.equal(acts[stack], out.hidden_states[-1])
    with patch(model, {stack: torch.zeros_like}):
        zeroed = model(input_ids=x).logits
    assert torch.equal(zeroed, torch.zeros_like(zeroed))  # lm_head has no bias in either family


def test_containers_are_not_hookpoints(llama):
    """A ModuleList has no forward of its own: a glob skips it, a name asks for its children."""
    assert "model.layers" not in resolve_hookpoints(llama.model, "model.*")
    with pytest.raises(ValueError, match=r"model\.layers\.0"):
        resolve_hookpoints(llama.model, "model.layers")


@torch.no_grad()
def test_hooks_act_only_on_the_registering_threads_forward(lm, family):
    """Two threads can run one model at once, each with its own hooks (the CPU harvest's streams):
    a hook ignores forward passes of other threads, so neither records nor stops them."""
    import threading

    model, layer = lm.model, LAYER[family].format(1)
    x, y = ids(0), ids(1)
    with capture(model, [layer], stop=True) as mine:
        other = {}
        t = threading.Thread(target=lambda: other.update(run_to_hookpoints(model, y, [layer])))
        t.start()
        t.join()
        assert mine == {} and layer in other  # the other pass went by this thread's hooks, whole
        with pytest.raises(StopForward):  # this thread's own hooks do fire
            model(input_ids=x)
    assert n_hooks(model) == 0
    torch.testing.assert_close(mine[layer], run_to_hookpoints(model, x, [layer])[layer])
    torch.testing.assert_close(other[layer], run_to_hookpoints(model, y, [layer])[layer])
