"""Loading masked LMs by local path, and the clear errors when that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kn.layout import Layout
from kn.devices import DeviceError, resolve_device
from kn.models.load import ModelLoadError, load_masked_lm


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_roberta_dir"])
def test_load_by_local_path(request, fixture):
    directory = request.getfixturevalue(fixture)
    model, tokenizer = load_masked_lm(directory)
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert tokenizer.mask_token_id is not None
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer.get_vocab())


def test_layer_norm_eps_override_reaches_every_layer_norm(tiny_bert_dir):
    model, _ = load_masked_lm(tiny_bert_dir, layer_norm_eps=1e-5)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    # embeddings + 2 per layer + MLM head (SPEC §1 counts 26 for 12 layers)
    assert len(norms) == 2 * model.config.num_hidden_layers + 2
    assert {m.eps for m in norms} == {1e-5}


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_masked_lm(str(missing))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_masked_lm(str(tmp_path))


def test_unknown_hub_id_offline_says_how_to_provide_weights():
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_masked_lm("kn-nonexistent-org/kn-nonexistent-model")


def test_checkpoint_without_mlm_head_is_rejected(tiny_bert_dir, tmp_path):
    from transformers import BertModel

    model, tokenizer = load_masked_lm(tiny_bert_dir)
    headless = tmp_path / "headless"
    BertModel(model.config).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    with pytest.raises(ModelLoadError, match="no trained masked-LM head"):
        load_masked_lm(headless)


def test_the_trained_organism_lives_under_its_alias():
    assert Layout("res", "kn-tiny").trained_model == "res/kn-tiny/model"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")
