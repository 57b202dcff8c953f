"""quantize.hub.push against a real HTTP server speaking the Hub API, with the real huggingface_hub client:
one commit, a failure halfway leaves the repo as it was, a rerun completes, the token never shows."""

import os

import pytest
from conftest import HUB_TOKEN, local_hub

from quantize.hub import push
from quantize.models import ModelError


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "int8"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    (out / "pytorch_model.bin").write_bytes(os.urandom(2_500_000))  # above the LFS threshold
    return out


@pytest.fixture
def hub(tmp_path):
    with local_hub(tmp_path / "hub") as hub:
        yield hub


def _local(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_creates_repo_and_uploads_in_one_commit(folder, hub):
    url = push(folder, "test-user/m", token=HUB_TOKEN)
    assert hub.head("test-user/m") in url
    assert len(hub.commits("test-user/m")) == 2  # "initial commit" + ours
    files = hub.files("test-user/m")
    files.pop(".gitattributes")
    assert files == _local(folder)


def test_commit_failing_halfway_leaves_repo_unchanged_then_rerun_completes(folder, hub):
    push(folder, "test-user/m", token=HUB_TOKEN)
    before = hub.head("test-user/m")
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2_500_000))
    (folder / "new.txt").write_text("new")
    hub.fail("commit", times=1, mode="500")  # LFS upload succeeds, the commit itself fails
    with pytest.raises(ModelError, match="unchanged") as err:
        push(folder, "test-user/m", token=HUB_TOKEN)
    assert HUB_TOKEN not in str(err.value)
    assert hub.head("test-user/m") == before
    assert "new.txt" not in hub.files("test-user/m")

    push(folder, "test-user/m", token=HUB_TOKEN)
    files = hub.files("test-user/m")
    files.pop(".gitattributes")
    assert files == _local(folder) and hub.head("test-user/m") != before


def test_wrong_token_is_a_clear_error(folder, hub):
    with pytest.raises(ModelError, match="HTTP 401") as err:
        push(folder, "test-user/m", token="hf_wrong_token_value")
    assert "hf_wrong_token_value" not in str(err.value)
    assert hub.head("test-user/m") is None


def test_missing_token(folder, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelError, match="HF_TOKEN"):
        push(folder, "test-user/m")


def test_push_killed_during_upload_leaves_last_commit_then_rerun_completes(folder, hub, tmp_path):
    """kill -9 of the pushing process while the weights upload: the repo stays at its last complete commit with
    nothing half-written visible, and pushing again completes."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    push(folder, "test-user/m", token=HUB_TOKEN)
    before, files_before = hub.head("test-user/m"), hub.files("test-user/m")
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2_500_000))
    (folder / "added.txt").write_text("added")
    hub.slow("lfs_upload", 30)  # the upload hangs long enough to be killed in the middle
    code = f"from quantize.hub import push; push({str(folder)!r}, 'test-user/m')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HF_TOKEN": HUB_TOKEN})
    deadline = time.monotonic() + 60
    while hub.calls("lfs_upload") == 0:
        assert proc.poll() is None and time.monotonic() < deadline, "the push never reached the upload"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert hub.head("test-user/m") == before and hub.files("test-user/m") == files_before

    hub.slow("lfs_upload", 0)
    push(folder, "test-user/m", token=HUB_TOKEN)
    files = hub.files("test-user/m")
    files.pop(".gitattributes")
    assert files == _local(folder) and hub.head("test-user/m") != before
