"""Test-wide setup. Nothing here reaches a real hub: HF_ENDPOINT names a loopback port where only the tests'
own LocalHub (tests/localhub/server.py) ever listens, and every model comes from the embedded default."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# huggingface_hub reads these once, at import, so they are set before anything imports it.
HUB_PORT = _free_port()
_SESSION = Path(tempfile.mkdtemp(prefix="q8chat-tests-"))
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",
    HF_HOME=str(_SESSION / "hf_home"),
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    TOKENIZERS_PARALLELISM="false",
    # Converted default model and INT8 folder, built once per test session (Q8CHAT_TEST_CACHE keeps them
    # across sessions for local iteration; CI always builds them fresh).
    Q8CHAT_CACHE=os.environ.get("Q8CHAT_TEST_CACHE") or str(_SESSION / "cache"),
    # Eager decode steps unless a test asks for the compiled ones (the app's default where a C++ compiler is
    # found): each compiled engine builds its graphs for minutes on 2 cores. app_server runs the default.
    Q8CHAT_COMPILED_STEP="0",
)
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "Q8CHAT_INT8_MODEL", "Q8CHAT_BF16_MODEL"):
    os.environ.pop(var, None)

ARTIFACTS = ROOT / "artifacts"
# A two-layer Llama: the whole quantize pipeline runs on it in seconds (with the default tokenizer's vocabulary).
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# OPT's config in its own words (TINY_LLAMA's keys would become stray attributes of an OPTConfig)
TINY_OPT = {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64}  # fmt: skip
HUB_TOKEN = "hf_test_local_hub_token"
# A question both served models answer with a wide margin on every kernel path (first token 2.4 nats ahead in
# BF16, INT8 with 8-bit and with 7-bit activations). Not the capital of France: there this model's BF16 prefers
# "The" to "L" by 0.12 nats, so INT8's noise decides, and with a scale per token it answers "L'Étoile, la maire".
QUESTION, ANSWER = "What is the capital of Japan?", "Tokyo"
# Planted in the environment of every app and CLI run the tests start; must never show up in what they print,
# write or serve (tests/test_secrets.py scans for it).
PLANTED_TOKEN = "hf_PLANTEDsecretTOKENxyz0123456789"


# Tests that use these are slow whatever their marks say: the real model's 4-minute quantize run, the app on it.
SLOW_FIXTURES = {"int8_run", "app_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION, ignore_errors=True)


def run_cli(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """`python -m quantize ...` in a child process, as a maintainer runs it. Without vLLM's stage unless `args` ask
    for it (--vllm-python): CI's venv would otherwise serve every tiny test model in vLLM, two minutes each."""
    quiet = {k: v for k, v in os.environ.items() if k != "Q8CHAT_VLLM_PYTHON"}
    return subprocess.run(
        [sys.executable, "-m", "quantize", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**quiet, **(env or {})},
    )


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; `timeout` only guards against a hang (the failure names `what`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="session")
def default_dir() -> Path:
    from quantize import models

    return models.default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from quantize import models

    return models.load_tokenizer(default_dir)


@pytest.fixture(scope="session")
def bf16(default_dir):
    from quantize import models

    return models.load_bf16(default_dir)


def local_hub(data_dir: Path):
    """A LocalHub on the port HF_ENDPOINT names; one at a time (tests/localhub/test_server.py binds it too)."""
    from localhub.server import LocalHub

    return LocalHub(data_dir, token=HUB_TOKEN, lfs_threshold=1_000_000, port=HUB_PORT)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory, tokenizer) -> dict:
    """Two tiny Llamas with different random weights, each with its INT8 copy: apps that start in seconds."""
    from quantize.tools import random_model

    root = tmp_path_factory.mktemp("pairs")
    return {
        name: random_model.build_config_model(root / name, tokenizer, size=TINY_LLAMA, samples=4, seed=seed)
        for seed, name in enumerate(("tiny-a", "tiny-b"))
    }


@pytest.fixture(scope="session")
def int8_run(default_dir) -> dict:
    """The real maintainer command on the embedded default model, once per session, pushed to a LocalHub.
    Its output folder is where `python app.py` looks for the default INT8 model, so the app tests reuse it."""
    from quantize.models import default_int8_dir

    out = default_int8_dir()
    repo = "test-user/smollm2-int8"
    if os.environ.get("Q8CHAT_TEST_REUSE_INT8") and (out / "inc_config.json").is_file():
        # local iteration on app tests only (with Q8CHAT_TEST_CACHE): skips the 4-minute quantize run, so
        # the tests that inspect that run or its pushed repo fail; CI never sets it
        return {"out": out, "stdout": "", "stderr": "", "repo": repo, "pushed": {}}
    with local_hub(_SESSION / "hub-int8") as hub:
        # the shipped recipe alone (no tuning search): it must meet the bar as it is
        flags = ("--out", str(out), "--overwrite", "--tune-trials", "1", "--push-to-hub", repo)
        vllm = os.environ.get("Q8CHAT_VLLM_PYTHON")  # the card's vLLM row, which test_export.py checks
        flags += ("--vllm-python", vllm) if vllm else ()
        proc = run_cli(*flags, env={"HF_TOKEN": HUB_TOKEN})
        pushed = hub.files(repo) if hub.head(repo) else {}
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr, "repo": repo, "pushed": pushed}


@contextlib.contextmanager
def running_app(log: Path, loaded: bool = True, **env: str):
    """`python app.py` as a visitor meets it, on a free loopback port; yields (url, process) once /status says
    both models are loaded (loaded=False: once a model answers). The log is kept in artifacts/ for a failed CI
    run."""
    import requests
    from gradio_client import Client

    port = _free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_TOKEN": PLANTED_TOKEN,
        **env,
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 900  # a cold start compiles both models' decode steps (~500 s here)
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "app did not become ready:\n" + log.read_text()[-3000:]
            try:
                if requests.get(url, timeout=2).ok:
                    s = Client(url, verbose=False).predict(api_name="/status")
                    if s["ready"] and not (loaded and s["loading"]):  # both loaded (or INT8 failed)
                        break
            except (requests.RequestException, ValueError, ConnectionError):
                pass
            time.sleep(1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / log.name).write_text(log.read_text())


# The test app's budget for visitors' kept conversations (quantize/runtime/prefixes.py): small, so that the load
# tests fill it in their first round and then see what the app holds beyond it.
PREFIX_MB = 24


@pytest.fixture(scope="session")
def app_server(int8_run, tmp_path_factory):
    """The app on the embedded default model and the INT8 folder the maintainer command wrote, as a visitor
    meets it: both models' decode steps compiled."""
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(log, Q8CHAT_PREFIX_MB=str(PREFIX_MB), Q8CHAT_COMPILED_STEP="1") as (url, proc):
        yield {"url": url, "proc": proc, "log": log}


@pytest.fixture(scope="session")
def app_url(app_server) -> str:
    return app_server["url"]


def raw_call(url: str, api_name: str, data: list) -> list:
    """An event of the app through Gradio's queue protocol by hand, as the page (or a script imitating it) calls
    it, hidden from the API or not: join, then read the event stream to the end."""
    import uuid

    r, read = join(url, api_name, data, session=uuid.uuid4().hex)
    assert r.ok, r.text
    kind, out = read()
    assert kind == "complete", (kind, out)
    return out


@functools.lru_cache
def fn_index(url: str, api_name: str) -> int:
    import requests

    config = requests.get(url + "config", timeout=10).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def join(url: str, api_name: str, data: list, session: str | None = None, headers: dict | None = None):
    """One request into the app's queue as a script sends it, not as gradio_client would: through /queue/join
    with the session hash it chose (a fresh one each time, if it likes), or with none at all through the public
    /call/<api_name> route; with whatever headers it likes. Returns (the HTTP response, how to read the result):
    read() waits for the event's end and gives ("complete", data) or ("error", message)."""
    import json

    import requests

    headers = {"Content-Type": "application/json", **(headers or {})}
    if session is None:
        r = requests.post(
            f"{url}gradio_api/call/{api_name}", json={"data": data}, headers=headers, timeout=30
        )
        event = r.json().get("event_id") if r.ok else None
        return r, lambda: read_call(f"{url}gradio_api/call/{api_name}/{event}")
    body = {"data": data, "fn_index": fn_index(url, api_name), "session_hash": session, "event_data": None,
            "trigger_id": None}  # fmt: skip
    r = requests.post(url + "gradio_api/queue/join", data=json.dumps(body), headers=headers, timeout=30)
    event = r.json().get("event_id") if r.ok else None
    return r, lambda: read_session(url, session, event)


def read_call(stream_url: str, timeout: float = 600) -> tuple[str, object]:
    import json

    import requests

    kind = None
    with requests.get(stream_url, stream=True, timeout=timeout) as r:
        for line in r.iter_lines():
            if line.startswith(b"event:"):
                kind = line[6:].strip().decode()
            elif line.startswith(b"data:") and kind in ("complete", "error"):
                return kind, json.loads(line[5:])
    return "ended", None


def read_session(url: str, session: str, event: str, timeout: float = 600) -> tuple[str, object]:
    """The end of one event of a session (a session's stream carries all its events)."""
    import json

    import requests

    with requests.get(
        url + "gradio_api/queue/data", params={"session_hash": session}, stream=True, timeout=timeout
    ) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed" and msg.get("event_id") == event:
                    if msg.get("success"):
                        return "complete", msg["output"]["data"]
                    return "error", msg.get("output", {}).get("error")
    return "ended", None
