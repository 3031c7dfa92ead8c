"""monosemantic: `Trainer.fit` on the shared batches, with its default path and defaults.

The Trainer pulls one batch per step from the iterator it is given; a step's time is taken from
the moment a batch is handed over to the moment the next one is asked for, so the batch reading
(the same for every implementation) is outside the clock as in the other workers. The last step
of a run has no next request, so one extra untimed step is run in "time" mode. Everything else
(LR 2e-4 / sqrt(F / 2^14) unless given, 1% warm-up, decay over the last 20%, AuxK, outlier
tokens dropped, normalisation folded at the end) is the Trainer's default.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import Batches, args, emit

from monosemantic.train import CoderSpec, TrainConfig, Trainer


def main() -> None:
    a = args()
    data = Batches(a["cache"], a["hookpoint"], a["batch_size"], a["seed"])
    train = a.get("out") is not None
    steps = a["warmup"] + a["steps"] + (0 if train else 1)
    cfg = TrainConfig(activation="topk", n_features=a["n_features"], k=a["k"],
                      tokens=steps * a["batch_size"], batch_size=a["batch_size"],
                      lr=a["lr"] or 0.0, seed=a["seed"])
    out = Path(a["out"]) if train else Path(tempfile.mkdtemp(prefix="ours-"))
    trainer = Trainer([CoderSpec("coder", a["hookpoint"], cfg)], {a["hookpoint"]: data.width}, out)
    starts, ends = [], []

    def batches(start: int):
        for i, x in enumerate(data):
            if i > 0:
                ends.append(time.perf_counter())
            starts.append(time.perf_counter())
            yield {a["hookpoint"]: x}

    t0 = time.perf_counter()
    trainer.fit(batches, progress=False)
    wall = time.perf_counter() - t0
    times = [e - s for s, e in zip(starts, ends)][a["warmup"]:a["warmup"] + a["steps"]]
    result = {"step_s": times, "wall_s": wall, "lr": trainer.states[0].res.lr}
    if train:
        result.update(folder=str(out / "coder"), layout="monosemantic")
    emit(result)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
