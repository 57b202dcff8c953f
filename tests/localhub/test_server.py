"""Drive tests/localhub/server.py with the real, unpatched huggingface_hub client."""

import atexit
import base64
import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


def _hub_port() -> int:
    """The port every LocalHub here binds: the one a preset HF_ENDPOINT names, else a free one."""
    preset = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/?", os.environ.get("HF_ENDPOINT", ""))
    if preset:
        return int(preset[1])
    if "huggingface_hub" in sys.modules:
        pytest.skip("huggingface_hub was imported before HF_ENDPOINT could be set", allow_module_level=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# huggingface_hub reads its settings once, when first imported, so they are set before the imports below.
# HF_ENDPOINT must name the local hub: CommitInfo parses commit URLs against it, and with
# HfApi(endpoint=...) alone every commit ends in "ValueError: Unable to retrieve user and repo ID".
# Hence one port, chosen now, which every LocalHub of this module binds in turn.
PORT = _hub_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="hf_home_")  # keeps ~/.cache untouched
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ.update(
    HF_ENDPOINT=ENDPOINT, HF_HOME=_HF_HOME, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1"
)
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER"):
    os.environ.pop(_var, None)

import requests  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from localhub.server import LocalHub  # noqa: E402

TOKEN = "hf_test_local_hub_token"
THRESHOLD = 10_000  # small, so LFS-size files stay cheap to make
SERVER_SCRIPT = Path(__file__).with_name("server.py")


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the hub"
        time.sleep(0.02)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub", token=TOKEN, lfs_threshold=THRESHOLD, port=PORT) as hub:
        yield hub


@pytest.fixture
def api(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture
def repo(api: HfApi) -> str:
    return api.create_repo("test-user/demo").repo_id


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, bytes]:
    """Two regular and two LFS-size files, written under tmp_path/"folder"."""
    files = {
        "config.json": b'{"hidden_size": 8}',
        "sub/notes.txt": b"hello\n",
        "weights.bin": os.urandom(3 * THRESHOLD),
        "sub/shard.safetensors": os.urandom(THRESHOLD + 1),
    }
    for name, data in files.items():
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(data)
    return files


def test_create_repo_and_exist_ok(api: HfApi, hub: LocalHub) -> None:
    assert api.whoami()["name"] == "test-user"
    url = api.create_repo("test-user/demo")
    assert url.repo_id == "test-user/demo" and url.startswith(hub.endpoint)
    head = hub.head("test-user/demo")
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert [c["title"] for c in hub.commits("test-user/demo")] == ["initial commit"]

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("test-user/demo")
    assert err.value.response.status_code == 409
    assert api.create_repo("test-user/demo", exist_ok=True).repo_id == "test-user/demo"
    assert hub.head("test-user/demo") == head


def test_upload_folder_mixes_regular_and_lfs_files_in_one_commit(
    api: HfApi, hub: LocalHub, repo: str, folder: dict[str, bytes], tmp_path: Path
) -> None:
    before = hub.head(repo)
    commit = api.upload_folder(repo_id=repo, folder_path=tmp_path / "folder")

    assert commit.oid == hub.head(repo) != before
    newest = hub.commits(repo)[0]
    assert newest["id"] == commit.oid and newest["parents"] == [before]
    assert hub.calls("lfs_upload") == 2  # only the two files above the threshold went through LFS
    stored = hub.files(repo)
    assert stored.pop(".gitattributes")
    assert stored == folder

    info = api.repo_info(repo, files_metadata=True)
    assert info.sha == hub.head(repo)
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
    big = ("weights.bin", "sub/shard.safetensors")
    assert lfs == {name: hashlib.sha256(folder[name]).hexdigest() for name in big}
    assert sorted(api.list_repo_files(repo)) == sorted([".gitattributes", *folder])
    assert [c.commit_id for c in api.list_repo_commits(repo)] == [c["id"] for c in hub.commits(repo)]


def test_downloads_are_byte_exact(
    api: HfApi, hub: LocalHub, repo: str, folder: dict[str, bytes], tmp_path: Path
) -> None:
    sha = api.upload_folder(repo_id=repo, folder_path=tmp_path / "folder").oid
    for name, data in folder.items():
        path = hf_hub_download(repo, name, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == data
        assert f"/snapshots/{sha}/" in Path(path).as_posix()
    assert hub.calls("lfs_download") == 2  # LFS files came through the redirect, like the Hub's CDN

    snapshot = Path(snapshot_download(repo, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "snap"))
    assert snapshot.name == sha
    for name, data in folder.items():
        assert (snapshot / name).read_bytes() == data


def test_missing_repo_revision_and_file_raise_the_client_errors(
    api: HfApi, hub: LocalHub, repo: str, tmp_path: Path
) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("test-user/nope")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "c")


def test_writes_without_the_token_are_refused(api: HfApi, hub: LocalHub, repo: str) -> None:
    before = hub.head(repo)
    for token in (False, "hf_wrong"):  # no Authorization header, then a wrong one
        intruder = HfApi(endpoint=hub.endpoint, token=token)
        with pytest.raises(HfHubHTTPError) as err:
            intruder.create_repo("test-user/other")
        assert err.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as err:
            intruder.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
        assert err.value.response.status_code == 401
    assert hub.head(repo) == before
    assert hub.head("test-user/other") is None

    api.create_repo("test-user/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).repo_info("test-user/secret")
    assert api.repo_info("test-user/secret").private is True


def test_commit_failing_with_500_leaves_head_unchanged_and_retry_succeeds(
    api: HfApi, hub: LocalHub, repo: str, folder: dict[str, bytes], tmp_path: Path
) -> None:
    before, files_before = hub.head(repo), hub.files(repo)
    hub.fail("commit", times=1, mode="500")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id=repo, folder_path=tmp_path / "folder")
    assert err.value.response.status_code == 500
    assert hub.head(repo) == before and hub.files(repo) == files_before

    commit = api.upload_folder(repo_id=repo, folder_path=tmp_path / "folder")
    assert hub.head(repo) == commit.oid
    assert hub.commits(repo)[0]["parents"] == [before]
    assert {k: v for k, v in hub.files(repo).items() if k != ".gitattributes"} == folder
    assert hub.calls("lfs_upload") == 2  # the retry found the LFS objects already on the hub


def test_dropped_lfs_upload_leaves_head_unchanged_and_retry_succeeds(
    api: HfApi, hub: LocalHub, repo: str
) -> None:
    data = os.urandom(2 * THRESHOLD)
    before = hub.head(repo)
    hub.fail("lfs_upload", times=1, mode="drop")
    hub.hold(
        "lfs_upload"
    )  # the client's own re-upload waits half-way, so the hub can be inspected in between
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(api.upload_file, path_or_fileobj=data, path_in_repo="big.bin", repo_id=repo)
        _wait_for(lambda: hub.calls("lfs_upload") >= 2)  # first attempt dropped, the retry is in flight
        assert hub.head(repo) == before
        assert "big.bin" not in hub.files(repo)
        assert not upload.done()
        hub.release("lfs_upload")
        commit = upload.result(timeout=60)
    assert hub.head(repo) == commit.oid
    assert hub.files(repo)["big.bin"] == data


def test_client_killed_mid_upload_leaves_no_trace(
    api: HfApi, hub: LocalHub, repo: str, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 * THRESHOLD))
    before = hub.head(repo)
    hub.hold("lfs_upload")  # the upload stops half-way until released
    child = (
        "import sys, huggingface_hub as h; h.upload_file(path_or_fileobj=sys.argv[1], "
        "path_in_repo='big.bin', repo_id=sys.argv[2])"
    )
    env = {**os.environ, "HF_TOKEN": TOKEN}  # the child reads HF_ENDPOINT and the token from its environment
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(big), repo],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: hub.calls("lfs_upload") >= 1 or proc.poll() is not None)
        assert proc.poll() is None, f"the client finished before it could be killed: {proc.stderr.read()}"
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert hub.head(repo) == before
    assert "big.bin" not in hub.files(repo)

    hub.release("lfs_upload")
    commit = api.upload_file(path_or_fileobj=str(big), path_in_repo="big.bin", repo_id=repo)
    assert hub.head(repo) == commit.oid
    assert hub.files(repo)["big.bin"] == big.read_bytes()


def test_request_log_and_connection_count_see_every_request(hub: LocalHub) -> None:
    """What tests rely on to assert "no request was made": every request is logged (refused, unrouted and
    failed ones too) by method and path, without its query; every connection is counted."""
    assert hub.requests == [] and hub.connections == 0
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{hub.endpoint}/api/whoami-v2", headers=auth, timeout=10).ok
    assert (
        requests.post(f"{hub.endpoint}/api/repos/create", json={"name": "x"}, timeout=10).status_code == 401
    )
    assert requests.delete(f"{hub.endpoint}/no/such/route?sig=secret", timeout=10).status_code == 404
    hub.fail("whoami", times=1, mode="drop")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{hub.endpoint}/api/whoami-v2", headers=auth, timeout=10)
    assert hub.requests == [
        ("GET", "/api/whoami-v2"),
        ("POST", "/api/repos/create"),
        ("DELETE", "/no/such/route"),
        ("GET", "/api/whoami-v2"),
    ]
    assert hub.connections == 4  # requests.get/post/delete each open (and close) their own connection


def test_hold_keeps_a_request_in_flight_until_released(api: HfApi, hub: LocalHub, repo: str) -> None:
    before = hub.head(repo)
    hub.hold("commit")
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(api.upload_file, path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
        _wait_for(lambda: hub.calls("commit") == 1)
        assert not upload.done() and hub.head(repo) == before
        hub.release("commit")
        commit = upload.result(timeout=60)
    assert hub.head(repo) == commit.oid and hub.files(repo)["x.txt"] == b"x"


def test_commit_pointing_at_a_never_uploaded_lfs_object_changes_nothing(hub: LocalHub, repo: str) -> None:
    before, files_before = hub.head(repo), hub.files(repo)
    missing = hashlib.sha256(b"never uploaded").hexdigest()
    ok = base64.b64encode(b"ok").decode()
    ndjson = "\n".join(
        json.dumps(line)
        for line in [
            {"key": "header", "value": {"summary": "bad"}},
            {"key": "file", "value": {"path": "ok.txt", "encoding": "base64", "content": ok}},
            {"key": "lfsFile", "value": {"path": "big.bin", "algo": "sha256", "oid": missing, "size": 14}},
        ]
    )
    r = requests.post(
        f"{hub.endpoint}/api/models/{repo}/commit/main",
        data=ndjson,
        timeout=10,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 400
    assert hub.head(repo) == before and hub.files(repo) == files_before


def test_lfs_upload_with_wrong_content_is_rejected(hub: LocalHub, repo: str) -> None:
    data = os.urandom(2 * THRESHOLD)
    oid = hashlib.sha256(data).hexdigest()
    batch = requests.post(
        f"{hub.endpoint}/{repo}.git/info/lfs/objects/batch",
        timeout=10,
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
    )
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert requests.put(href, data=os.urandom(len(data)), timeout=10).status_code == 400
    assert requests.put(href.split("?")[0], data=data, timeout=10).status_code == 403  # unsigned URL
    assert requests.put(href, data=data, timeout=10).status_code == 200


def test_command_line_server_and_http_failure_knobs(tmp_path: Path) -> None:
    env = {**os.environ, "LOCAL_HUB_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVER_SCRIPT),
            "--data",
            str(tmp_path / "hub"),
            "--port",
            "0",
            "--token-env",
            "LOCAL_HUB_TOKEN",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([proc.stdout], [], [], 10)[0], "the server printed nothing within 10 s"
        line = proc.stdout.readline()
        endpoint = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line).group(1)
        api = HfApi(endpoint=endpoint, token=TOKEN)
        assert api.whoami()["name"] == "test-user"

        knob, plan = f"{endpoint}/_test/fail", {"route": "whoami", "times": 1, "mode": "503"}
        assert requests.post(knob, json=plan, timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.post(knob, json=plan, headers=auth, timeout=10).status_code == 200
        with pytest.raises(HfHubHTTPError) as err:
            api.whoami()
        assert err.value.response.status_code == 503
        assert api.whoami()["name"] == "test-user"
    finally:
        proc.terminate()
        out, errors = proc.communicate(timeout=10)
    assert TOKEN not in line + out + errors
    assert out == "" and errors == ""
