"""eai-sparsify 1.3.3 end to end from text: its own `Trainer` given the model and the tokens.

    PYTHON worker_sparsify_e2e.py '{"model": HF folder, "tokens": file.npy, "hookpoint": "layers.15",
                                   "n_features": 9216, "k": 32, "batch_contexts": 16,
                                   "exclude": [ids], "out": folder, "threads": 2}'

`tokens` holds [N, ctx] int token ids (BOS-led contexts, packed by monosemantic as its own cache
does); `exclude` are the special-token ids both implementations leave out of training. The model
is loaded as sparsify's own CLI loads it for its default loss, FVU (`sparsify.__main__.
load_artifacts`): `AutoModel`, the decoder without the language-model head, in the checkpoint's
dtype (float32; bf16 is chosen there only on CUDA). sparsify hooks the hookpoint during a forward
of the whole decoder (every layer runs), optimizer Adam with its automatic LR. Reports the wall
time of `Trainer.fit` and the tokens it trained on.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch


def main() -> None:
    a = json.loads(sys.argv[1])
    torch.set_num_threads(int(a["threads"]))
    from datasets import Dataset
    from sparsify import SaeConfig, Trainer, TrainConfig
    from transformers import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(a["model"], dtype=torch.float32)
    tokens = np.load(a["tokens"])
    data = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(SaeConfig(num_latents=a["n_features"], k=a["k"]), batch_size=a["batch_contexts"],
                      optimizer="adam", hookpoints=[a["hookpoint"]], exclude_tokens=a["exclude"],
                      log_to_wandb=False, save_dir=a["out"], save_every=10**9)
    trainer = Trainer(cfg, data, model)
    t1 = time.perf_counter()
    trainer.fit()
    t2 = time.perf_counter()
    used = tokens[: len(tokens) // a["batch_contexts"] * a["batch_contexts"]]
    kept = int((~np.isin(used, a["exclude"])).sum())
    print("RESULT " + json.dumps({"fit_s": t2 - t1, "wall_s": t2 - t0, "tokens": kept}), flush=True)


if __name__ == "__main__":
    main()
