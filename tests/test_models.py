"""Resolving a model argument: nothing -> embedded default, a folder, or a Hub id (a real local Hub server)."""

import socket
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import HUB_TOKEN, local_hub, run_cli

from quantize import models
from quantize.errors import ModelError


def test_hub_id_offline_makes_no_request(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1: the sentence at once, without a single request to the Hub HF_ENDPOINT names (a LocalHub
    listens there and counts); online, the same call does reach it, so the zero is the client's doing."""
    with local_hub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set") as err:
            models.resolve_model("test-user/smol")
        assert hub.requests == [] and hub.connections == 0
        assert "'test-user/smol'" in str(err.value)

        monkeypatch.delenv("HF_HUB_OFFLINE")
        with pytest.raises(ModelError, match="No model 'test-user/smol'"):
            models.resolve_model("test-user/smol")
        assert hub.requests and hub.connections > 0


def test_hub_id_with_nobody_listening_is_the_sentence(monkeypatch):
    """HF_ENDPOINT names a port held bound but not listening: the kernel refuses the connection and the answer
    is the sentence naming the endpoint (not a traceback, not a wait for a timeout)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(ModelError, match="not reachable") as err:
            models.resolve_model("org/model")
    assert endpoint in str(err.value) and "'org/model'" in str(err.value)


def test_hub_that_hangs_up_gets_one_connection_then_the_sentence(monkeypatch):
    """A Hub that accepts the connection and drops it (a server going down): one connection, no retry loop (a
    retrying client with backoff is what makes "no network" slow), then the sentence."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(60)  # guards against a client that never connects; not a speed requirement
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        with ThreadPoolExecutor(1) as pool:
            attempt = pool.submit(models.resolve_model, "org/model")
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            conn.close()
            with pytest.raises(ModelError, match="not reachable"):
                attempt.result(timeout=60)
        # Any further attempt would have connected (the kernel completes it into the backlog) before the call
        # returned, so a non-blocking accept finds it now.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("./missing-folder", "does not exist"),
        ("not a repo id!", "neither a model folder nor a valid Hub repo id"),
    ],
)
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
        models.load_inc_int8(default_dir)


def test_each_model_argument_gets_an_int8_folder_of_its_own(tmp_path, monkeypatch):
    """The app builds a BF16 model's INT8 copy into a cache folder named after the argument: a Hub id and a local
    folder of the same name never share it, and no argument names the INT8 cache itself (which a build replaces)."""
    monkeypatch.setenv("Q8CHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x" / "org" / "m").mkdir(parents=True)  # a folder named like the Hub id org/m
    args = ["org/m", str(tmp_path / "x" / "org" / "m"), ".", "..", "./x/org/m", "other/m", None]
    dirs = {arg: models.default_int8_dir(arg) for arg in args}
    cache = (tmp_path / "cache" / "int8").resolve()
    assert all(d.resolve().parent == cache for d in dirs.values()), dirs
    assert dirs[str(tmp_path / "x" / "org" / "m")] == dirs["./x/org/m"]  # one folder, named two ways
    assert len({dirs[a] for a in args if a != "./x/org/m"}) == len(args) - 1, dirs


def test_the_app_never_unpickles_a_downloaded_bf16_model(tmp_path, default_dir):
    """A BF16 model from the Hub with pickled weights only (pytorch_model.bin): the app says why it does not load
    it, and never opens the file (a pickle runs code as it loads; this one would fail the test if it did)."""
    import shutil

    from huggingface_hub import HfApi

    from quantize.runtime import serving

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(default_dir / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle anyone may open")
    with local_hub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
        api.create_repo("test-user/pickled")
        api.upload_folder(folder_path=str(folder), repo_id="test-user/pickled")
        state = serving.Serving([])
        serving.load_pair(state, serving.Pair("pickled", bf16="test-user/pickled"))
    assert state.bf16.decoder is None and "no safetensors weights" in state.bf16.error, state.bf16.error
    assert not state.ready


def test_a_decoy_safetensors_file_does_not_let_downloaded_pickles_load(tmp_path, default_dir):
    """A Hub repo with pickled weights (pytorch_model.bin) and a decoy `extra.safetensors` beside them, and a
    large file the model does not need: the app and the maintainer's command refuse it in one sentence, and the
    download never fetched the pickle or the large file. (Before: any *.safetensors let transformers unpickle
    pytorch_model.bin, and a download took the whole repo.)"""
    import shutil

    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from quantize.runtime import serving

    folder = tmp_path / "decoy"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(default_dir / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle anyone may open")
    save_file({"decoy": torch.zeros(1)}, str(folder / "extra.safetensors"))
    (folder / "training_data.tar").write_bytes(b"\0" * 1_000_000)
    with local_hub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
        api.create_repo("test-user/decoy")
        api.upload_folder(folder_path=str(folder), repo_id="test-user/decoy")
        before = len(hub.requests)
        state = serving.Serving([])
        serving.load_pair(state, serving.Pair("decoy", bf16="test-user/decoy"))
        cli = run_cli("--model", "test-user/decoy", "--out", str(tmp_path / "out"))
        fetched = [path for _, path in hub.requests[before:]]
    assert state.bf16.decoder is None and "no safetensors weights" in state.bf16.error, state.bf16.error
    assert cli.returncode != 0 and "no safetensors weights" in cli.stderr, cli.stderr[-2000:]
    assert not any(p.endswith(("pytorch_model.bin", "training_data.tar")) for p in fetched), fetched
    assert any(p.endswith("config.json") for p in fetched), fetched
