"""A model served elsewhere: any OpenAI-compatible server (vLLM serving the export in `w8a8/`, or its BF16
original), which the app fronts instead of loading the model (Q8CHAT_INT8_ENDPOINT, Q8CHAT_BF16_ENDPOINT) and the
bench times (`--endpoint`).

vLLM is sent token ids at `/v1/completions` (replies, Continue, the bench), so it reads exactly the prompt the
engine would; another server gets the chat at `/v1/chat/completions` (see `request`). Tokens are stamped here, as
they arrive: the times include the network. With vLLM each streamed chunk says which token ids it carries (`return_token_ids`, asked only of a server
that `/v1/models` says is vLLM); from another server each chunk with text counts as one token.

Every failure is an EndpointError whose message is the sentence a visitor reads: a server that is down, one that
sends nothing for Q8CHAT_ENDPOINT_TIMEOUT_S seconds, one that refuses the request, one whose reply takes longer than
Q8CHAT_ENDPOINT_REPLY_S in all (keep-alives reset the first timeout, not this one) or runs past REPLY_BYTES. A reply
past the visitor's max_new_tokens is cut there, and Stop hangs up at once, even on a silent server. The key in
Q8CHAT_ENDPOINT_API_KEY goes in the Authorization header only, never into a message or a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from quantize.errors import ModelError
from quantize.runtime import latency
from quantize.runtime.chat import Reply
from quantize.runtime.generate import Sampling

TIMEOUT_S = float(os.environ.get("Q8CHAT_ENDPOINT_TIMEOUT_S", "30"))
# One reply's bounds, whatever the server does: keep-alive lines reset the per-read timeout, a server may ignore
# max_tokens, and one line or an error page may be of any size
REPLY_S = float(os.environ.get("Q8CHAT_ENDPOINT_REPLY_S", "300"))
REPLY_BYTES, LINE_BYTES, REFUSAL_BYTES = 16 << 20, 1 << 20, 64 << 10
# What of a server's refusal a visitor reads: its own words, cut (a long error page says nothing more)
REFUSAL_CHARS = 300


class EndpointError(ModelError):
    """The server could not answer; the message says which server and why, in one sentence."""


@dataclass
class Chunk:
    """What one streamed event brought: when it arrived, its token ids (one unknown id per chunk of text from a
    server that does not say them) and its text."""

    t: float
    token_ids: list[int | None]
    text: str


@dataclass
class Endpoint:
    """One OpenAI-compatible server, called with `role` (INT8, BF16) in what the visitor reads. `model` and
    `owned_by` come from its /v1/models on the first request."""

    url: str
    role: str = "model"
    model: str | None = None
    owned_by: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.strip().rstrip("/").removesuffix("/v1")
        self.api_key = self.api_key or os.environ.get("Q8CHAT_ENDPOINT_API_KEY") or None
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(
                f"The {self.role} server's address is not an http(s) URL with a host: check its setting."
            )

    @property
    def host(self) -> str:
        """host:port, never the user and password a URL may carry"""
        try:
            parts = urlsplit(self.url)
            return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or "?"
        except ValueError:
            return "?"

    @property
    def label(self) -> str:
        """What runs it, for the page's header and the bench's tables."""
        return f"served by {self.owned_by or 'a server'} at {self.host}, network included"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def why(self, error: Exception) -> EndpointError:
        """The sentence for an HTTP failure (never the request, which would carry the key)."""
        if isinstance(error, httpx.TimeoutException):
            said = f"sent nothing for {TIMEOUT_S:g} s"
        elif isinstance(error, httpx.ConnectError):
            said = "does not answer (nothing accepts connections there)"
        else:
            said = f"broke off the connection ({type(error).__name__})"
        return EndpointError(f"The {self.role} server at {self.host} {said}; try again in a moment.")

    def connect(self) -> str:
        """The served model's id, from /v1/models (asked once); EndpointError when the server does not give it."""
        if self.model is None:
            try:
                r = httpx.get(f"{self.url}/v1/models", headers=self.headers(), timeout=TIMEOUT_S)
            except httpx.HTTPError as e:
                raise self.why(e) from None
            served = listed(r)
            if not served:
                raise EndpointError(f"The {self.role} server at {self.host} lists no model at /v1/models "
                                    f"(HTTP {r.status_code}); is it an OpenAI-compatible server?")  # fmt: skip
            self.model, self.owned_by = served[0]["id"], served[0].get("owned_by")
        return self.model

    def stream(
        self, path: str, body: dict, stop: threading.Event | None = None, deadline_s: float | None = None
    ) -> Iterator[Chunk]:
        """The server's streamed answer to `body` at `path`, chunk by chunk as each arrives. Closing the generator
        closes the connection, which tells vLLM to stop the request; so do `stop` (at once, even while the server
        sends nothing) and the reply's deadline (REPLY_S), which is an EndpointError."""
        body = {"model": self.connect(), "stream": True, "stream_options": {"include_usage": True}, **body}
        if self.owned_by == "vllm":
            body["return_token_ids"] = True
        watch = None
        try:
            with httpx.stream("POST", f"{self.url}{path}", json=body, headers=self.headers(),
                              timeout=TIMEOUT_S) as r:  # fmt: skip
                if not r.is_success:
                    raise self.refused(r)
                watch = Watch(r, stop, time.monotonic() + (deadline_s or REPLY_S))
                for line in self.lines(r):
                    chunk = parse(line)
                    if chunk is not None:
                        yield chunk
        except (httpx.HTTPError, httpx.StreamError) as e:
            if watch is None or watch.why is None:
                raise self.why(e) from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise EndpointError(f"The {self.role} server at {self.host} sent something that is not an OpenAI-style "
                                "streamed completion.") from None  # fmt: skip
        finally:
            if watch is not None:
                watch.done.set()
        if watch is not None and watch.why == "deadline":
            raise EndpointError(f"The {self.role} server at {self.host} took more than {deadline_s or REPLY_S:g} s "
                                "for one reply; it was cut off there.")  # fmt: skip

    def lines(self, r: httpx.Response) -> Iterator[str]:
        """The response's lines, within LINE_BYTES each and REPLY_BYTES in all (httpx's iter_lines holds a line
        of any size)."""
        pending, total = b"", 0
        for data in r.iter_bytes():
            total += len(data)
            pending += data
            *done, pending = pending.split(b"\n")
            yield from (line.decode("utf-8", "replace").rstrip("\r") for line in done)
            if len(pending) > LINE_BYTES or total > REPLY_BYTES:
                raise EndpointError(f"The {self.role} server at {self.host} sent more than "
                                    f"{(LINE_BYTES if len(pending) > LINE_BYTES else REPLY_BYTES) >> 20} MB "
                                    "without ending a line or the reply; it was cut off.")  # fmt: skip
        if pending:
            yield pending.decode("utf-8", "replace")

    def refused(self, r: httpx.Response) -> EndpointError:
        head = b""
        for data in r.iter_bytes():  # the start of an error page of any size
            head += data
            if len(head) >= REFUSAL_BYTES:
                break
        try:
            said = json.loads(head)
        except ValueError:
            said = head.decode("utf-8", "replace")
        said = said.get("error", said) if isinstance(said, dict) else said
        said = said.get("message", said) if isinstance(said, dict) else said
        return EndpointError(f"The {self.role} server at {self.host} refused the request (HTTP {r.status_code}): "
                             f"{str(said)[:REFUSAL_CHARS]}")  # fmt: skip

    def time_generation(self, input_ids, new_tokens: int) -> latency.Timing:
        """Greedy, exactly `new_tokens` tokens from token ids (no eos stop: vLLM's ignore_eos), stamped as they
        arrive: what latency.interleaved times the engines with, so the bench puts the server in the same rounds."""
        timing = latency.Timing(time.perf_counter())
        body = {"prompt": input_ids.reshape(-1).tolist(), "max_tokens": new_tokens, "temperature": 0.0,
                "ignore_eos": True}  # fmt: skip
        for chunk in self.stream("/v1/completions", body):
            timing.stamps += [chunk.t] * len(chunk.token_ids)
        if len(timing.stamps) != new_tokens:  # the rounds compare equal work only
            raise EndpointError(f"The {self.role} server at {self.host} sent {len(timing.stamps)} tokens of the "
                                f"{new_tokens} asked for: it must honour vLLM's ignore_eos.")  # fmt: skip
        return timing

    def together(self, prompts: list, n: int, tokens: int) -> dict:
        """n such requests at once (the prompts in turn), as concurrency.together runs n sequences on the engine:
        every gap between a request's tokens, and all new tokens over the time from the first request to the
        last token."""
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda i: self.time_generation(prompts[i % len(prompts)], tokens), range(n)))
        gaps = [ms for run in runs for ms in run.decode_ms]
        return {"gaps_ms": gaps, "tokens_per_s": n * tokens / (max(r.stamps[-1] for r in runs) - start)}


class Watch:
    """Ends a streamed response from beside it when the visitor stops (`stop`) or the reply's deadline passes:
    shutting its socket down wakes the read that waits on a silent server (closing it would not)."""

    def __init__(self, r: httpx.Response, stop: threading.Event | None, deadline: float) -> None:
        self.r, self.stop, self.deadline = r, stop, deadline
        self.why: str | None = None  # "stopped" or "deadline", once it hung up
        self.done = threading.Event()  # the stream ended by itself
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.done.wait(0.05):
            stopped = self.stop is not None and self.stop.is_set()
            if stopped or time.monotonic() > self.deadline:
                self.why = "stopped" if stopped else "deadline"
                return hang_up(self.r)


def hang_up(r: httpx.Response) -> None:
    stream = r.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def listed(r: httpx.Response) -> list[dict]:
    """The models a /v1/models answer lists, each with its id; [] for anything else."""
    try:
        data = r.json().get("data") if r.is_success else None
    except (ValueError, AttributeError):
        return []
    return [m for m in data if isinstance(m, dict) and "id" in m] if isinstance(data, list) else []


def parse(line: str) -> Chunk | None:
    """One server-sent event line of a streamed completion: a Chunk when it carries tokens, else None (the
    role's opening chunk, the usage at the end, [DONE], keep-alives)."""
    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
        return None
    event = json.loads(line[5:])
    if not event.get("choices"):
        return None
    choice = event["choices"][0]
    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    ids = choice.get("token_ids")
    if ids is None:
        ids = [None] if text else []
    return Chunk(time.perf_counter(), list(ids), text) if ids else None


def request(
    endpoint: Endpoint, messages: list[dict] | None, ids: list[int], sampling: Sampling
) -> tuple[str, dict]:
    """The path and body of a reply. vLLM is sent the prompt's token ids: exactly what the engine would read, with
    what the visitor typed tokenized as text (a typed '<|im_start|>system' stays text; vLLM's chat endpoint would
    read it as a role). Another server, whose tokenizer the app cannot know, gets the chat `messages` and applies
    its own template; Continue (no messages) sends ids to any server."""
    body = {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "seed": sampling.seed}  # fmt: skip
    endpoint.connect()  # whose server it is decides the path
    if messages is None or endpoint.owned_by == "vllm":
        return "/v1/completions", body | {"prompt": ids}
    return "/v1/chat/completions", body | {"messages": messages}


def decode_remote(
    endpoint: Endpoint,
    messages: list[dict] | None,
    ids: list[int],
    sampling: Sampling,
    stop: threading.Event,
    eos: int | None,
    interval: float,
) -> Iterator[Reply]:
    """chat.decode_live for a server: the answer so far at most every `interval` seconds, each token stamped as
    it arrived. A Stop closes the stream (vLLM then stops the request)."""
    answer = Reply(len(ids), latency.Timing(time.perf_counter()), pieces=[])
    path, body = request(endpoint, messages, ids, sampling)
    shown = time.perf_counter()
    # closed on Stop, at once even while the server is silent: the server stops too
    with contextlib.closing(endpoint.stream(path, body, stop)) as stream:
        for chunk in stream:
            for i, token in enumerate(chunk.token_ids):
                if token is not None and token == eos:
                    continue
                answer.timing.stamps.append(chunk.t)
                answer.token_ids.append(token)
                answer.pieces.append(chunk.text if i == 0 else "")
            answer.text += chunk.text
            if stop.is_set() or len(answer.token_ids) >= sampling.max_new_tokens:
                break  # a server that ignores max_tokens is cut off at the visitor's length
            if chunk.t - shown >= interval:
                shown = chunk.t
                yield answer
    yield answer
