"""No token in logs, errors, the UI, the model card or the repo: tokens are planted where a leak would show."""

import os
import re
import subprocess
import sys

import pytest
import requests
from conftest import HUB_TOKEN, PLANTED_TOKEN, ROOT, local_hub

# What a real token looks like; the two fake ones the tests plant are the only ones allowed in the repo.
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")


def test_maintainer_run_leaks_no_token(int8_run):
    """The session's real `python -m quantize ... --push-to-hub` ran with HF_TOKEN set: its output, the folder
    it wrote (model card, report) and what reached the Hub hold no token."""
    assert HUB_TOKEN not in int8_run["stdout"] + int8_run["stderr"]
    for path in int8_run["out"].rglob("*"):
        if path.is_file():
            assert HUB_TOKEN.encode() not in path.read_bytes(), path
    for name, data in int8_run["pushed"].items():
        assert HUB_TOKEN.encode() not in data, name


def test_failed_push_with_debug_logging_leaks_no_token(tmp_path):
    """A refused push, with huggingface_hub's debug logging on: the planted token is in no line printed."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code = (
        "import logging, sys; from quantize.maintainer.hub import push; from quantize.errors import ModelError\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        f"try:\n    push({str(folder)!r}, 'test-user/x')\nexcept ModelError as e:\n    print('error:', e)\n"
        "    raise\n"
    )
    with local_hub(tmp_path / "hub"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_TOKEN": PLANTED_TOKEN, "HF_HUB_VERBOSITY": "debug"},
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "HTTP 401" in out, out[-2000:]
    assert PLANTED_TOKEN not in out
    assert PLANTED_TOKEN[3:] not in out  # not even without its prefix


@pytest.mark.slow
def test_app_leaks_no_token(app_server):
    """The app ran with HF_TOKEN planted: not in its log, its page, its config or its API answers."""
    url = app_server["url"]
    from gradio_client import Client

    served = [requests.get(url + p, timeout=10).text for p in ("", "config", "gradio_api/info")]
    served.append(str(Client(url, verbose=False).predict(api_name="/status")))
    for text in served + [app_server["log"].read_text()]:
        assert PLANTED_TOKEN not in text


def test_repo_holds_no_token():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        found = set(TOKEN_SHAPE.findall(path.read_text(errors="ignore"))) - {PLANTED_TOKEN}
        assert not found, (name, found)
