"""eai-sparsify 1.3.3: its `SparseCoder` trained by a loop that mirrors its trainer's per-step code.

sparsify's `Trainer` only takes a model plus tokens (it hooks the model's forward), so on cached
activations we run, per step, what `Trainer.fit` and its forward hook do for loss_fn="fvu",
optimizer="adam" (sparsify/trainer.py of 1.3.3):
  step 0: b_dec <- mean of the batch (encoder bias stays 0 for an SAE);
  every step: set_decoder_norm_to_unit_norm (normalize_decoder, not transcoding);
    dead_mask = tokens_since_fired > dead_feature_threshold if auxk_alpha > 0 else None
    (the defaults: auxk_alpha 0, so no AuxK); total_variance of the batch;
    out = sae(x, y=x, dead_mask, total_variance); did_fire[latent_indices] = True;
    loss = fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8; backward;
    remove_gradient_parallel_to_decoder_directions; Adam step (torch Adam: bitsandbytes absent),
    zero_grad, linear warm-up/decay schedule; tokens_since_fired update.
LR: sparsify's rule 2e-4 / sqrt(F / 2^14); warm-up its 1000 steps, capped at warmup_frac of the
run. No Triton on CPU: sparsify announces and uses its embedding_bag decoder.
"""

from __future__ import annotations

import time

import torch
from common import Batches, args, emit, reference_rows, save_reference, timed_loop, warmup_steps, mark_baseline
from sparsify import SparseCoder, SparseCoderConfig
from transformers import get_linear_schedule_with_warmup


def main() -> None:
    a = args()
    source = Batches(a["cache"], a["hookpoint"], a["batch_size"], a["seed"])
    mark_baseline()
    batches = iter(source)
    first = next(batches)
    d = first.shape[1]
    cfg = SparseCoderConfig(activation="topk", num_latents=a["n_features"], k=a["k"])
    sae = SparseCoder(d, cfg, device="cpu", dtype=torch.float32)
    lr = a["lr"] or 2e-4 / (sae.num_latents / 2**14) ** 0.5
    total = a["warmup"] + a["steps"]
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = get_linear_schedule_with_warmup(opt, warmup_steps(1000, total, a["warmup_frac"]), total)
    auxk_alpha, dead_threshold = 0.0, 10_000_000  # TrainConfig defaults
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()

    data = _prepend(first, batches)
    t0 = time.perf_counter()
    times = timed_loop(step, data, a["warmup"], a["steps"])
    result = {"step_s": times, "wall_s": time.perf_counter() - t0, "lr": lr}
    if a.get("out"):
        sae.set_decoder_norm_to_unit_norm()  # as the trainer does before every forward
        sae.save_to_disk(a["out"])
        x = reference_rows(source)
        with torch.no_grad():  # sparsify's own loader and forward on the saved folder
            save_reference(a["out"], x, SparseCoder.load_from_disk(a["out"])(x).sae_out)
        result.update(folder=a["out"], layout="sparsify")
    emit(result)


def _prepend(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    main()
