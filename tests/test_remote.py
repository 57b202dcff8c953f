"""The app on a remote engine (Q8CHAT_INT8_ENDPOINT, Q8CHAT_BF16_ENDPOINT): `python app.py` fronting real
OpenAI-compatible servers over HTTP. vLLM serving the export and its BF16 original, where the vLLM venv is (CI);
a server that is down and one that never answers, everywhere."""

import functools
import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import ANSWER, ARTIFACTS, PLANTED_TOKEN, QUESTION, _free_port, running_app, wait_for
from test_export import vllm_python

from app import DEFAULT_SYSTEM

# What the chat API returns, in order (app.wire_events' outputs, as Client.predict gives them back)
OUTPUTS = ("history", "box", "chart", "table", "bf16_answer", "notice", "live", "race_int8", "race_bf16")
KEY = "sk-endpoint-" + PLANTED_TOKEN  # the servers' API key: must reach them, and never a log or the page


def ask(url: str, message: str, compare: bool, tokens: int = 24) -> dict:
    from gradio_client import Client

    out = Client(url, verbose=False).predict(
        message, [], DEFAULT_SYSTEM, tokens, 0.0, 0.95, compare, api_name="/chat"
    )
    return dict(zip(OUTPUTS, out))


def text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


class Silent(ThreadingHTTPServer):
    """An OpenAI-compatible server that lists its model and then refuses every completion (`refusing`) or never
    answers one: what a server under too much load looks like from outside. It records the Authorization header each request carried."""

    daemon_threads = True

    def __init__(self) -> None:
        self.released, self.authorizations, self.refusing = threading.Event(), [], True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.authorizations.append(self.headers.get("Authorization"))
                body = json.dumps({"data": [{"id": "silent-model", "owned_by": "nobody"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                server.authorizations.append(self.headers.get("Authorization"))
                if server.refusing:
                    body = json.dumps({"error": {"message": "the queue is full, " + "x" * 2000}}).encode()
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                server.released.wait(120)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_a_server_that_is_slow_or_down_is_a_sentence(tmp_path):
    """The INT8 server refuses (its words, cut short), then never answers: the visitor reads which server and why, the chat is as it was and the
    message is back in the box; the app stays up. Then the server is gone: the same, with 'does not answer'. The
    API key reached the server and nothing the app wrote."""
    silent = Silent()
    threading.Thread(target=silent.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{silent.server_address[1]}"
    log = tmp_path / "app-silent-server.log"
    env = {"Q8CHAT_INT8_ENDPOINT": f"http://{host}/v1", "Q8CHAT_ENDPOINT_TIMEOUT_S": "2",
           "Q8CHAT_ENDPOINT_API_KEY": KEY}  # fmt: skip
    with running_app(log, **env) as (url, proc):
        refused = ask(url, QUESTION, compare=True)
        said = f"The INT8 server at {host} refused the request (HTTP 503): the queue is full, xxx"
        assert said in refused["notice"] and len(refused["notice"]) < 600, refused["notice"]
        assert refused["history"] == [] and refused["box"] == QUESTION
        silent.refusing = False
        slow = ask(url, QUESTION, compare=True)
        assert f"The INT8 server at {host} sent nothing for 2 s" in slow["notice"], slow["notice"]
        assert slow["history"] == [] and slow["box"] == QUESTION
        silent.shutdown()
        silent.server_close()
        silent.released.set()
        down = ask(url, QUESTION, compare=True)
        assert f"The INT8 server at {host} does not answer" in down["notice"], down["notice"]
        assert down["history"] == [] and down["box"] == QUESTION
        assert proc.poll() is None
        assert httpx.get(url + "config", timeout=10).is_success
    assert silent.authorizations and set(silent.authorizations) == {f"Bearer {KEY}"}
    assert KEY not in log.read_text() and "sk-endpoint" not in log.read_text()


class Rude(ThreadingHTTPServer):
    """An OpenAI-compatible server that misbehaves in one of these ways (`how`), over real HTTP: "endless" streams
    tokens past max_tokens for ever, "keepalive" sends only keep-alive comments, "long line" one line that never
    ends, "huge error" a refusal with a 64 MB body. `hung_up` is set when the app closed the connection under it,
    `sent` counts the bytes it wrote until then."""

    daemon_threads = True

    def __init__(self, how: str) -> None:
        self.how, self.hung_up, self.asked, self.sent = how, threading.Event(), threading.Event(), 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = json.dumps({"data": [{"id": "rude-model", "owned_by": "nobody"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                server.asked.set()
                huge = server.how == "huge error"
                self.send_response(503 if huge else 200)
                self.send_header(
                    "Content-Length" if huge else "Content-Type",
                    str(64 << 20) if huge else "text/event-stream",
                )
                self.end_headers()
                token = "data: " + json.dumps({"choices": [{"text": "x"}]}) + "\n\n"
                piece = {"endless": token, "keepalive": ": keep-alive\n\n", "long line": "data: " + "x" * 65536,
                         "huge error": "e" * 65536}[server.how]  # fmt: skip
                try:
                    for _ in range(100_000):  # about a minute of keep-alives, 6 GB of the others
                        self.wfile.write(piece.encode())
                        self.wfile.flush()
                        server.sent += len(piece)
                        if server.how == "keepalive":
                            server.hung_up.wait(0.05)
                except OSError:  # the app hung up
                    server.hung_up.set()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self):
        from quantize.runtime import remote

        return remote.Endpoint(f"http://127.0.0.1:{self.server_address[1]}/v1", role="INT8")


def remote_reply(endpoint, stop: threading.Event | None = None, tokens: int = 16):
    from quantize.runtime import remote
    from quantize.runtime.generate import Sampling

    sampling = Sampling(max_new_tokens=tokens, temperature=0.0, top_p=1.0)
    replies = list(
        remote.decode_remote(endpoint, None, [1, 2, 3], sampling, stop or threading.Event(), None, 0.1)
    )
    return replies[-1]


def test_a_server_that_ignores_max_tokens_is_cut_off_at_the_visitors_length():
    rude = Rude("endless")
    reply = remote_reply(rude.endpoint, tokens=16)
    assert len(reply.token_ids) == 16 and reply.text == "x" * 16
    wait_for(rude.hung_up.is_set, 30, "the app to hang up on the server")


def test_stop_hangs_up_on_a_server_that_sends_only_keep_alives():
    """A server that keeps the connection alive and sends no token: the visitor's Stop ends the reply and the
    connection at once, not at the next token (there is none)."""
    rude, stop = Rude("keepalive"), threading.Event()
    done = threading.Event()
    reply: list = []
    threading.Thread(target=lambda: (reply.append(remote_reply(rude.endpoint, stop)), done.set())).start()
    wait_for(rude.asked.is_set, 30, "the request to reach the server")
    assert not done.wait(1.0)  # keep-alives only: the reply goes on
    stop.set()
    wait_for(done.is_set, 10, "the reply to end on Stop")
    wait_for(rude.hung_up.is_set, 10, "the connection to be closed")
    assert reply[0].token_ids == []


def test_a_reply_that_never_ends_meets_its_deadline(monkeypatch):
    from quantize.runtime import remote

    monkeypatch.setattr(remote, "REPLY_S", 1.0)
    rude = Rude("keepalive")
    with pytest.raises(remote.EndpointError, match="took more than 1 s"):
        remote_reply(rude.endpoint)
    wait_for(rude.hung_up.is_set, 10, "the connection to be closed")


@pytest.mark.parametrize(
    ("how", "says"), [("long line", "without ending a line"), ("huge error", "HTTP 503")]
)
def test_a_line_or_an_error_page_of_any_size_is_read_only_so_far(how, says):
    """A line that never ends, an error page of 64 MB: the visitor reads a sentence, and the app hung up long before
    the server sent it all (the server's writes fail)."""
    from quantize.runtime import remote

    rude = Rude(how)
    with pytest.raises(remote.EndpointError, match=says) as err:
        remote_reply(rude.endpoint)
    assert len(str(err.value)) < 600
    wait_for(rude.hung_up.is_set, 30, "the app to hang up on the server")
    assert rude.sent < 16 << 20, rude.sent  # what the app read, and the sockets' buffers


def test_a_bad_address_is_a_sentence_and_a_password_in_it_is_never_shown():
    from quantize.runtime import remote

    for bad in ("localhost:8000", "http://127.0.0.1:abc", "ftp://127.0.0.1:21", "http:///v1"):
        with pytest.raises(remote.EndpointError, match="not an http\\(s\\) URL"):
            remote.Endpoint(bad, "INT8")
    port = _free_port()  # nothing listens there
    endpoint = remote.Endpoint(f"http://me:{KEY}@127.0.0.1:{port}/v1", "INT8")
    with pytest.raises(remote.EndpointError) as failed:
        endpoint.connect()
    assert f"The INT8 server at 127.0.0.1:{port} does not answer" in str(failed.value)
    assert KEY not in str(failed.value) + endpoint.label


# ---------------------------------------------------------------- vLLM


def vllm_server(python: str, model: Path, log: Path, *more: str) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI-compatible server on `model`, on a free port, with the test's API key."""
    port = _free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
               "--dtype", "bfloat16", "--max-model-len", "2048", "--api-key", KEY, *more]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env | served_env(), cwd=log.parent
        )
    return proc, f"http://127.0.0.1:{port}"


def served_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("Q8CHAT_")}


def up(proc: subprocess.Popen, url: str, log: Path) -> bool:
    assert proc.poll() is None, log.read_text()[-3000:]
    try:
        return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).is_success
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def vllm_servers(int8_run, default_dir, tmp_path_factory):
    """vLLM serving the export (INT8) and the BF16 original (with the export's tokenizer, which transformers 5
    decodes), started together; their logs go to artifacts/."""
    python = vllm_python()
    w8a8, logs = int8_run["out"] / "w8a8", tmp_path_factory.mktemp("vllm")
    servers = {
        "INT8": vllm_server(python, w8a8, logs / "vllm-int8.log"),
        "BF16": vllm_server(python, default_dir, logs / "vllm-bf16.log", "--tokenizer", str(w8a8)),
    }
    try:
        for name, (proc, url) in servers.items():
            ready = functools.partial(up, proc, url, logs / f"vllm-{name.lower()}.log")
            wait_for(ready, 900, f"vLLM serving {name}")
        yield {name: url for name, (_, url) in servers.items()} | {
            "procs": {n: p for n, (p, _) in servers.items()}
        }
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
        ARTIFACTS.mkdir(exist_ok=True)
        for f in logs.iterdir():
            (ARTIFACTS / f.name).write_text(f.read_text())


@pytest.fixture(scope="module")
def remote_app(vllm_servers, tmp_path_factory):
    log = tmp_path_factory.mktemp("remote-app") / "app-on-vllm.log"
    env = {"Q8CHAT_INT8_ENDPOINT": vllm_servers["INT8"], "Q8CHAT_BF16_ENDPOINT": vllm_servers["BF16"],
           "Q8CHAT_ENDPOINT_API_KEY": KEY}  # fmt: skip
    with running_app(log, **env) as (url, proc):
        yield {"url": url, "log": log}
    assert KEY not in log.read_text()


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def served_answer(url: str, messages: list[dict], tokens: int) -> str:
    """vLLM's own greedy answer, asked directly."""
    body = {"model": httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"],
            "messages": messages, "max_tokens": tokens, "temperature": 0.0}  # fmt: skip
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    return r.json()["choices"][0]["message"]["content"]


def test_the_app_answers_through_vllm(remote_app, vllm_servers):
    """The chat's answer is vLLM's on the export (the same greedy answer vLLM gives when asked directly), BF16's is
    vLLM's on the original; the panel times both and says who served them, network included."""
    got = ask(remote_app["url"], QUESTION, compare=True, tokens=32)
    answer = text(got["history"][-1])
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": QUESTION}]
    assert answer == served_answer(vllm_servers["INT8"], messages, 32) and ANSWER in answer
    assert got["bf16_answer"] == served_answer(vllm_servers["BF16"], messages, 32)
    for name in ("INT8", "BF16"):
        host = vllm_servers[name].removeprefix("http://")
        assert f"{name} served by vllm at {host}, network included" in got["table"], got["table"]
    medians = re.search(r"\| Median ms / token \| ([\d.]+) \| ([\d.]+) \|", got["table"])
    assert medians and float(medians[1]) > 0 and float(medians[2]) > 0, got["table"]
    assert "finished at" in got["race_int8"] and answer.strip()[:20] in got["race_int8"]


def test_the_page_on_vllm_in_a_browser(remote_app):
    """The page a visitor sees: the answer streams in from vLLM and the panel says where it was served. A
    screenshot goes to artifacts/app-on-vllm.png."""
    from test_app_server import BOT, app_page

    errors: list[str] = []
    with app_page(remote_app["url"], errors, header="served by vllm") as page:
        page.fill("#message textarea", QUESTION)
        page.click("#send")
        page.wait_for_selector(f"{BOT}:has-text({ANSWER!r})", timeout=120_000)
        # the last frame: both answered, the verdict on top, the line on who served them under the table
        page.wait_for_selector("#table :text-matches('faster|slower')", timeout=120_000)
        assert "network included" in page.inner_text("#table")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-on-vllm.png"), full_page=True)
    assert not errors, errors


def test_continue_and_the_benchmark_tab_run_on_the_servers(remote_app, vllm_servers, tokenizer):
    """Continue sends the stopped answer's prompt and words as token ids: the answer grows in place by what vLLM
    itself writes after them. The Benchmark tab times both servers in its interleaved rounds."""
    from gradio_client import Client

    from quantize.runtime import chat

    client, story = Client(remote_app["url"], verbose=False), "Write a long story about a lighthouse keeper."
    history, *_ = client.predict(story, [], DEFAULT_SYSTEM, 8, 0.0, 0.95, False, api_name="/chat")
    said = text(history[-1])
    prompt = chat.build_prompt(tokenizer, DEFAULT_SYSTEM, [], story)[0]  # what the session keeps for Continue
    out = client.predict(history, 16, 0.0, 0.95, False, api_name="/continue")
    grown = text(out[0][-1])
    ids = prompt + tokenizer(said, add_special_tokens=False).input_ids
    body = {"model": httpx.get(f"{vllm_servers['INT8']}/v1/models", headers=auth()).json()["data"][0]["id"],
            "prompt": ids, "max_tokens": 16, "temperature": 0.0}  # fmt: skip
    theirs = httpx.post(
        f"{vllm_servers['INT8']}/v1/completions", json=body, headers=auth(), timeout=120
    ).json()
    assert grown == said + theirs["choices"][0]["text"] and len(grown) > len(said), (said, grown)
    chart, table = client.predict(8, 2, api_name="/benchmark")
    rows = [dict(zip(chart["columns"], r)) for r in chart["data"]]
    assert sorted((r["model"], r["round"]) for r in rows) == [
        ("BF16", 1),
        ("BF16", 2),
        ("INT8", 1),
        ("INT8", 2),
    ]
    assert all(r["ms"] > 0 for r in rows) and "network included" in table


def test_the_bench_times_the_servers_in_the_engines_rounds(vllm_servers, tmp_path):
    """`python -m quantize.bench --endpoint`: both servers in the same interleaved rounds as the engines, one
    sequence and two at once, and in the per-token table; each round's generations had every token asked for."""
    from test_bench import run_bench

    endpoints = [
        "--endpoint",
        f"vllm-int8={vllm_servers['INT8']}",
        "--endpoint",
        f"vllm-bf16={vllm_servers['BF16']}",
    ]
    common = ["--tokens", "8", "--rounds", "2", "--prompts", "1", "--threads", "2", *endpoints]
    out = tmp_path / "together.json"
    proc = run_bench(
        *common, "--concurrency", "1", "2", "--json", str(out), env={"Q8CHAT_ENDPOINT_API_KEY": KEY}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n, per in json.loads(out.read_text())["concurrency"]["2"].items():
        assert set(per) == {"int8", "bf16", "vllm-int8", "vllm-bf16"}
        assert all(len(m["round_tokens_per_s"]) == 2 and m["median_ms"] > 0 for m in per.values()), n
    out = tmp_path / "rounds.json"
    proc = run_bench(
        *common, "--no-peer", "--json", str(out), env={"Q8CHAT_ENDPOINT_API_KEY": KEY}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = json.loads(out.read_text())["threads"]["2"]["models"]
    assert all(len(models[n]["round_median_ms"]) == 2 for n in ("int8", "vllm-int8", "vllm-bf16"))
    assert re.search(r"^vllm-int8 +[\d.]+ ", proc.stdout, re.M) and "the INT8 engine is" in proc.stdout
    assert KEY not in proc.stdout + proc.stderr


def test_bf16_server_gone_leaves_int8_answering(remote_app, vllm_servers):
    """The BF16 server stops: INT8's answer still comes, and the visitor reads why nothing was compared."""
    proc = vllm_servers["procs"]["BF16"]
    proc.terminate()
    proc.wait(60)
    got = ask(remote_app["url"], QUESTION, compare=True)
    assert ANSWER in text(got["history"][-1])
    host = vllm_servers["BF16"].removeprefix("http://")
    assert f"Not compared: The BF16 server at {host} does not answer" in got["notice"], got["notice"]
