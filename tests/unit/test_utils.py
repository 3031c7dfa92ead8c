"""utils: the safetensors writer that streams tensors from their memory."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from monosemantic.utils import atomic_save_safetensors


def test_streamed_safetensors_read_back_by_safetensors(tmp_path):
    tensors = {"w": torch.randn(3, 4), "steps": torch.arange(5), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "half": torch.randn(2, 3).to(torch.bfloat16),
               "mask": torch.tensor([True, False]), "strided": torch.randn(4, 6)[:, ::2]}
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(path, tensors, {"format": "pt", "note": "x"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    assert not list(tmp_path.glob(".*"))  # no temporary left beside it
