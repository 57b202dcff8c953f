"""Resolving a model argument: nothing -> embedded default, a folder, or a Hub id (a real local Hub server)."""

import time

import pytest
from conftest import HUB_TOKEN, local_hub

from quantize import models
from quantize.models import ModelError


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError, match="not reachable"):
        models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - start < 1


def test_hub_id_with_no_server_fails_fast():
    # HF_ENDPOINT names a loopback port nobody listens on here: refused at once, no hang
    start = time.monotonic()
    with pytest.raises(ModelError, match="not reachable"):
        models.resolve_model("org/model")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("arg, message", [
    ("./missing-folder", "does not exist"),
    ("not a repo id!", "neither a model folder nor a valid Hub repo id"),
])
def test_bad_arguments(arg, message):
    with pytest.raises(ModelError, match=message):
        models.resolve_model(arg)


def test_hub_download_through_local_server(tmp_path, default_dir):
    from huggingface_hub import HfApi

    with local_hub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
        api.create_repo("test-user/smol")
        api.upload_folder(folder_path=str(default_dir), repo_id="test-user/smol")
        path = models.resolve_model("test-user/smol", token=HUB_TOKEN)
        assert (path / "config.json").read_bytes() == (default_dir / "config.json").read_bytes()
        assert models.load_tokenizer(path).eos_token == "<|im_end|>"
        with pytest.raises(ModelError, match="No model 'test-user/absent'"):
            models.resolve_model("test-user/absent", token=HUB_TOKEN)
        with pytest.raises(ModelError, match="no revision"):
            models.resolve_model("test-user/smol", revision="v9", token=HUB_TOKEN)


def test_load_int8_refuses_a_folder_quantize_did_not_write(default_dir):
    with pytest.raises(ModelError, match="not an INT8 folder"):
        models.load_int8(default_dir)
