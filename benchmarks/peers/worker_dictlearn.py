"""dictionary-learning 0.1.0: its `TopKTrainer.update`, one call per step, as `trainSAE` runs it.

`trainSAE` (dictionary_learning/training.py) would import the package root, whose activation
buffer imports nnsight (installed without it: nnsight pulls a CUDA torch), so its per-step loop is
repeated here: with normalize_activations=True (the README's recommendation) the batches are
divided by norm_factor = sqrt(mean ||x||^2) estimated on 100 batches, `trainer.update(step, x)`
each step, and at the end `ae.scale_biases(norm_factor)`, exactly as trainSAE does. The trainer
modules are imported without executing the package's __init__ (they need only torch and einops).
LR: the trainer's rule 2e-4 / sqrt(F / 2^14); warm-up its 1000 steps capped at warmup_frac of the
run; AuxK (1/32) as in its defaults. The trained AutoEncoderTopK is written in eai-sparsify's
layout (encoder.weight/bias, W_dec = decoder.weight.T, b_dec; ReLU then top-k, the same forward),
since dictionary-learning itself only pickles (`torch.save`), which we never load.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from common import Batches, args, emit, reference_rows, save_reference, timed_loop, warmup_steps, mark_baseline


def import_trainer():
    """dictionary_learning.trainers.top_k without running dictionary_learning/__init__.py."""
    spec = importlib.util.find_spec("dictionary_learning")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["dictionary_learning"] = pkg  # a package object whose __init__ never ran
    from dictionary_learning.trainers.top_k import TopKTrainer

    return TopKTrainer


def main() -> None:
    a = args()
    TopKTrainer = import_trainer()
    data = Batches(a["cache"], a["hookpoint"], a["batch_size"], a["seed"])
    norm_batches = iter(Batches(a["cache"], a["hookpoint"], a["batch_size"], a["seed"] + 10**6))
    mark_baseline()
    n_norm = int(a.get("norm_batches", 100))  # trainSAE: get_norm_factor(data, steps=100)
    norm_factor = float(torch.stack([next(norm_batches).pow(2).sum(1).mean() for _ in range(n_norm)])
                        .mean().sqrt())
    total = a["warmup"] + a["steps"]
    trainer = TopKTrainer(steps=total, activation_dim=data.width, dict_size=a["n_features"],
                          k=a["k"], layer=15, lm_name="cached", lr=a["lr"], seed=a["seed"],
                          warmup_steps=warmup_steps(1000, total, a["warmup_frac"]), device="cpu")
    trainer.ae.scale_biases(1.0)

    def step(i: int, x: torch.Tensor) -> None:
        trainer.update(i, x / norm_factor)

    t0 = time.perf_counter()
    times = timed_loop(step, iter(data), a["warmup"], a["steps"])
    result = {"step_s": times, "wall_s": time.perf_counter() - t0, "lr": trainer.lr,
              "norm_factor": norm_factor}
    if a.get("out"):
        ae = trainer.ae
        ae.scale_biases(norm_factor)
        save_as_sparsify(ae, Path(a["out"]), a["k"])
        x = reference_rows(data)
        with torch.no_grad():  # dictionary-learning's own forward
            save_reference(a["out"], x, ae(x))
        result.update(folder=a["out"], layout="sparsify")
    emit(result)


def save_as_sparsify(ae, folder: Path, k: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": ae.encoder.weight, "encoder.bias": ae.encoder.bias,
               "W_dec": ae.decoder.weight.T, "b_dec": ae.b_dec}
    save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "num_latents": ae.dict_size, "k": k, "d_in": ae.activation_dim,
           "transcode": False, "skip_connection": False, "normalize_decoder": True,
           "trained_with": "dictionary-learning 0.1.0 TopKTrainer"}
    (folder / "cfg.json").write_text(json.dumps(cfg))


if __name__ == "__main__":
    main()
