"""Loading pairs from local directories through the users' path, and refusing what does not fit."""

import json
import shutil

import pytest
import torch

from core.models import LoadError, LoadOptions, load_pair
from testkit.tiny import write_tiny_adapter, write_tiny_model


def test_adapter_pair_shares_one_copy_of_the_base_weights(tiny_pair):
    info = tiny_pair.info()
    assert info["adapter"] is True and info["finetune_kind"] == "adapter"
    assert info["n_layers"] == 4 and info["d_model"] == 64 and info["architecture"] == "Qwen2"
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert tiny_pair.merged is None
    base_ids = {id(p) for p in tiny_pair.model.get_base_model().parameters()}
    assert info["memory_mb"]["adapter"] < 0.1 * info["memory_mb"]["base"]
    assert len(base_ids) == len(list(tiny_pair.model.parameters()))  # adapter params are inside the one model


def test_fine_tune_of_another_architecture_is_refused(tiny_dirs, tmp_path):
    wide = write_tiny_model(tmp_path / "wide", "qwen2", "chatml", hidden=96)
    wide_adapter = write_tiny_adapter(wide, tmp_path / "wide_adapter")
    with pytest.raises(LoadError, match="width (96|192) in the adapter but (64|128) in the base"):
        load_pair(str(tiny_dirs["qwen2"]), str(wide_adapter))
    deep = write_tiny_model(tmp_path / "deep", "qwen2", "chatml", layers=6)
    deep_adapter = write_tiny_adapter(deep, tmp_path / "deep_adapter")
    with pytest.raises(LoadError, match="weights for layer [45], but the base has 4 layers"):
        load_pair(str(tiny_dirs["qwen2"]), str(deep_adapter))
    with pytest.raises(LoadError, match="num_hidden_layers is 6, but the base has 4"):
        load_pair(str(tiny_dirs["qwen2"]), str(deep))


def test_missing_and_wrong_paths_are_named(tiny_dirs, tmp_path):
    with pytest.raises(LoadError, match="the adapter path does not exist"):
        load_pair(str(tiny_dirs["qwen2"]), str(tmp_path / "no_such_adapter"))
    with pytest.raises(LoadError, match="no such file or directory"):
        load_pair(str(tmp_path / "no_such_model"), "none")
    with pytest.raises(LoadError, match="is a PEFT adapter; pass it as --finetuned"):
        load_pair(str(tiny_dirs["qwen2_adapter"]), "none")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="no config.json"):
        load_pair(str(empty), "none")


def test_pickle_checkpoints_need_allow_pickle(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["qwen2"], pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    with pytest.raises(LoadError, match="only pickle checkpoints.*--allow-pickle"):
        load_pair(str(pickled), "none")
    pair = load_pair(str(pickled), "none", LoadOptions(allow_pickle=True))
    assert pair.info()["finetuned"] is None


def test_fingerprints_follow_content(tiny_dirs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dirs["qwen2"], copy)
    a = load_pair(str(tiny_dirs["qwen2"]), "none")
    b = load_pair(str(copy), "none")
    assert a.base.fingerprint == b.base.fingerprint  # same content, other place
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert load_pair(str(copy), "none").base.fingerprint != a.base.fingerprint
