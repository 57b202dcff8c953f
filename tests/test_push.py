"""quantize.maintainer.hub.push against a real HTTP server speaking the Hub API, with the real huggingface_hub client:
one commit, a failure halfway leaves the repo as it was, a rerun completes, the token never shows."""

import os

import pytest
from conftest import HUB_TOKEN, local_hub, wait_for

from quantize.errors import ModelError
from quantize.maintainer.hub import push


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


def _commits(hub, repo: str) -> list[str]:
    """The repo's commit ids, newest first, as the Hub API lists them to any client."""
    from huggingface_hub import HfApi

    return [c.commit_id for c in HfApi(endpoint=hub.endpoint, token=HUB_TOKEN).list_repo_commits(repo)]


def test_push_creates_repo_and_uploads_in_one_commit(folder, hub):
    url = push(folder, "test-user/m", token=HUB_TOKEN)
    commits = _commits(hub, "test-user/m")
    # Creating a repo on the Hub makes its first commit (a .gitattributes alone); the push is one commit on it.
    assert len(commits) == 2
    assert set(hub.files("test-user/m", revision=commits[1])) == {".gitattributes"}
    assert commits[0] == hub.head("test-user/m") and commits[0] in url
    files = hub.files("test-user/m", revision=commits[0])
    files.pop(".gitattributes")
    assert files == _local(folder)


def test_commit_failing_halfway_leaves_repo_unchanged_then_rerun_completes(folder, hub):
    push(folder, "test-user/m", token=HUB_TOKEN)
    before, commits_before = hub.head("test-user/m"), _commits(hub, "test-user/m")
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2_500_000))
    (folder / "new.txt").write_text("new")
    hub.fail("commit", times=1, mode="500")  # LFS upload succeeds, the commit itself fails
    with pytest.raises(ModelError, match="unchanged") as err:
        push(folder, "test-user/m", token=HUB_TOKEN)
    assert HUB_TOKEN not in str(err.value)
    assert hub.head("test-user/m") == before and _commits(hub, "test-user/m") == commits_before
    assert "new.txt" not in hub.files("test-user/m")

    push(folder, "test-user/m", token=HUB_TOKEN)
    files = hub.files("test-user/m")
    files.pop(".gitattributes")
    assert files == _local(folder) and hub.head("test-user/m") != before
    assert _commits(hub, "test-user/m")[1:] == commits_before  # exactly one commit more, on top of the last


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

    from conftest import ROOT

    push(folder, "test-user/m", token=HUB_TOKEN)
    before, files_before = hub.head("test-user/m"), hub.files("test-user/m")
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2_500_000))
    (folder / "added.txt").write_text("added")
    commits_before = _commits(hub, "test-user/m")
    hub.hold("lfs_upload")  # the upload stops half-way, to be killed in the middle
    code = f"from quantize.maintainer.hub import push; push({str(folder)!r}, 'test-user/m')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HF_TOKEN": HUB_TOKEN})
    wait_for(
        lambda: hub.calls("lfs_upload") > 0 or proc.poll() is not None, 120, "the push to reach the upload"
    )
    assert proc.poll() is None, "the push ended before it reached the upload"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert hub.head("test-user/m") == before and hub.files("test-user/m") == files_before
    assert _commits(hub, "test-user/m") == commits_before

    hub.release("lfs_upload")
    push(folder, "test-user/m", token=HUB_TOKEN)
    files = hub.files("test-user/m")
    files.pop(".gitattributes")
    assert files == _local(folder) and hub.head("test-user/m") != before
    assert _commits(hub, "test-user/m")[1:] == commits_before  # the rerun added exactly one commit
