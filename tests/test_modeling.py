"""`align.modeling`: a model path that cannot exist is refused at once, without a Hub lookup (issue 12, finding 4);
the one dtype rule of policies and reward models."""

import pytest
import torch

from align.errors import ConfigError
from align.modeling import (
    ModelConfig,
    check_model_path,
    dtype_name,
    load_tokenizer,
    model_path_problem,
    resolve_dtype,
)


@pytest.mark.parametrize("path", ["./nope", "/no/such/model", "~/no-such-model-here", "a/b/c", "not a hub id!"])
def test_a_missing_path_that_looks_local_is_refused(path):
    assert "does not exist" in model_path_problem(path)


def test_a_missing_path_under_a_local_folder_is_local(tmp_path, monkeypatch):
    """`outputs/nope` is shaped like a Hub id; its first component being a local folder makes it a local path."""
    monkeypatch.chdir(tmp_path)
    assert model_path_problem("outputs/nope") is not None  # no local folder: a Hub id, and HF_HUB_OFFLINE is set
    (tmp_path / "outputs").mkdir()
    assert "does not exist" in model_path_problem("outputs/nope")


def test_an_existing_folder_passes_and_a_file_is_refused(tiny_model_dir, tmp_path):
    assert model_path_problem(str(tiny_model_dir)) is None
    (tmp_path / "model.bin").write_bytes(b"")
    assert "is a file" in model_path_problem(str(tmp_path / "model.bin"))


def test_an_uncached_hub_id_is_refused_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in model_path_problem("no-such-org/no-such-model-xyz")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert model_path_problem("no-such-org/no-such-model-xyz") is None  # online: left to the Hub


def test_loaders_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: '\./nope' does not exist"):
        load_tokenizer(ModelConfig(name_or_path="./nope"))
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path: "):
        check_model_path("./nope", key="reference.name_or_path")


def test_dtype_resolution(monkeypatch):
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name) is getattr(torch, name) and dtype_name(resolve_dtype(name)) == name
        assert ModelConfig(name_or_path="m", dtype=name).torch_dtype() is getattr(torch, name)
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32  # bf16 matmuls are emulated on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto") is torch.bfloat16 and resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32  # the device the weights go to decides, not the machine
    assert ModelConfig(name_or_path="m").torch_dtype() is torch.bfloat16
    with pytest.raises(ConfigError, match=r"dtype must be auto, a torch dtype or one of float32, bfloat16, float16"):
        resolve_dtype("fp8")
    with pytest.raises(ConfigError, match=r"^dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        ModelConfig(name_or_path="m", dtype="fp8")
