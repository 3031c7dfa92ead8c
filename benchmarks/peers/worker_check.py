"""Load a coder folder with a peer's own loader and run the peer's forward on given inputs.

    PYTHON worker_check.py '{"layout": "sparsify" | "saelens", "folder": ..., "x": file}'

`x` is a safetensors file with tensor "x" [N, D]; the peer's output is written beside it as
"<layout>_out" in <x>.<layout>.safetensors. This is how coders saved by monosemantic's
`save_sparsify` / `save_saelens` are checked against the peers themselves.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    a = json.loads(sys.argv[1])
    x = load_file(a["x"])["x"]
    with torch.no_grad():
        if a["layout"] == "sparsify":
            from sparsify import SparseCoder

            out = SparseCoder.load_from_disk(a["folder"])(x).sae_out
        else:
            from sae_lens import SAE

            out = SAE.load_from_disk(a["folder"]).eval()(x)
    path = f"{a['x']}.{a['layout']}.safetensors"
    save_file({"out": out.contiguous()}, path)
    print("RESULT " + json.dumps({"out": path}), flush=True)


if __name__ == "__main__":
    main()
