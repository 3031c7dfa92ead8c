"""SAELens 6.54.12: its own `SAETrainer` driving a `TopKTrainingSAE`, one `trainer.step` per batch.

`SAETrainer.step` is the public per-step seam that `fit()` and SAELens' MultiSAETrainer call
(scale the batch, forward with AuxK, dead-feature counters, backward, grad-norm clipping at 1,
Adam, LR and coefficient schedulers); the loop here adds `n_training_steps += 1` as `fit()` does
and leaves out only W&B logging and checkpoints. The SAE config is SAELens' TopK default
(rescale_acts_by_decoder_norm=True, decoder_init_norm 0.1, aux_loss_coefficient 1,
apply_b_dec_to_input, no activation normalisation) with use_sparse_activations=False: its sparse
path crashes in backward on CPU with torch 2.13 (aten::view is not implemented for sparse tensors),
so the dense path is the one timed. LR: SAELens' default 3e-4, constant schedule, no warm-up.
The trained SAE is written by `save_inference_model` (decoder norms folded, cfg.json +
sae_weights.safetensors).
"""

from __future__ import annotations

import time

import torch
from common import Batches, args, emit, reference_rows, save_reference, timed_loop, mark_baseline
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def main() -> None:
    a = args()
    data = Batches(a["cache"], a["hookpoint"], a["batch_size"], a["seed"])
    mark_baseline()
    total = a["warmup"] + a["steps"]
    cfg = TopKTrainingSAEConfig(d_in=data.width, d_sae=a["n_features"], k=a["k"], dtype="float32",
                                device="cpu", use_sparse_activations=False)
    cfg.metadata.hook_name = a["hookpoint"]
    cfg.metadata.hf_hook_name = a["hookpoint"]
    sae = TopKTrainingSAE(cfg)
    lr = a["lr"] or 3e-4
    trainer_cfg = SAETrainerConfig(total_training_samples=total * a["batch_size"],
                                   train_batch_size_samples=a["batch_size"], lr=lr, lr_end=lr / 10,
                                   device="cpu")
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))

    def step(i: int, x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    t0 = time.perf_counter()
    times = timed_loop(step, iter(data), a["warmup"], a["steps"])
    result = {"step_s": times, "wall_s": time.perf_counter() - t0, "lr": lr}
    if a.get("out"):
        trainer.set_final_sae_metadata()
        sae.save_inference_model(a["out"])
        x = reference_rows(data)
        with torch.no_grad():  # SAELens' own loader and forward on the saved folder
            save_reference(a["out"], x, SAE.load_from_disk(a["out"]).eval()(x))
        result.update(folder=a["out"], layout="saelens")
    emit(result)


if __name__ == "__main__":
    main()
