"""A script against the running app, over raw HTTP as its author would drive it (not gradio_client's defaults):
a fresh session hash with every request, no session at all through /gradio_api/call, a forged X-Forwarded-For,
owner actions from another machine. On a Space (SPACE_ID set, the tiny pair: replies of 256 tokens that take a
second or two) and on `python app.py` as it runs on the default model."""

import json
import threading
import uuid

import pytest
import requests
from conftest import TINY_LLAMA, fn_index, join, running_app

from app import DEFAULT_SYSTEM
from quantize.runtime.chat import text_of
from quantize.tools import random_model

pytestmark = pytest.mark.slow
# What the README promises: one address holds at most 4 requests waiting or running, one visitor (a session, or
# all of one address's session-less calls) 3; the app has 8 reply slots and a queue of 16.
ONE_ADDRESS, ONE_VISITOR = 4, 3
LONG = ["Write a very long story about a ship.", [], DEFAULT_SYSTEM, 256, 0.0, 0.95, False, None]


WINDOW = 512  # the tiny model's context window: under the app's 1,024-token input limit
ADMIN_TOKEN = "q8-admin-PLANTED-0123456789abcdef"  # the Space owner's: must never show in a log or a page


@pytest.fixture(scope="module")
def space_app(tokenizer, tmp_path_factory):
    """The app as a Space runs it (SPACE_ID set: behind HF's proxy), with no admin token, one reply at a time (so
    that a reply waits in the queue behind another), on a tiny Llama whose window is WINDOW tokens."""
    root = tmp_path_factory.mktemp("space")
    size = {**TINY_LLAMA, "max_position_embeddings": WINDOW}
    bf16_dir, int8_dir = random_model.build_config_model(root / "model", tokenizer, size=size, samples=4)
    env = dict(SPACE_ID="me/q8-chat", Q8CHAT_BF16_MODEL=str(bf16_dir), Q8CHAT_INT8_MODEL=str(int8_dir),
               Q8CHAT_SLOTS="1", Q8CHAT_ADMIN_TOKEN=ADMIN_TOKEN)  # fmt: skip
    log = root / "app-space-abuse.log"
    with running_app(log, **env) as (url, _):
        yield url, log


def flood(url: str, requests_: list[tuple[str | None, dict]]) -> tuple[list, int]:
    """Sends every (session, headers) request at once, as fast as one client can; returns the readers of those
    the app took and how many it refused with HTTP 429 (anything else fails the test)."""
    taken, refused = [], 0
    for session, headers in requests_:
        r, read = join(url, "chat", LONG, session=session, headers=headers)
        if r.status_code == 429:
            assert "waiting or running" in r.json()["detail"], r.text
            refused += 1
        else:
            assert r.ok, (r.status_code, r.text)
            taken.append(read)
    return taken, refused


def all_answered(readers: list) -> list:
    """Reads every taken request to its end, together (a reply streams only while its stream is read)."""
    results: list = [None] * len(readers)

    def one(i: int) -> None:
        results[i] = readers[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(readers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


def answered(result) -> bool:
    kind, data = result
    return kind == "complete" and data[0][-1]["role"] == "assistant" and bool(text_of(data[0][-1]["content"]))


def test_fresh_sessions_behind_a_forged_forwarded_header_count_as_one_address(space_app):
    space_url, _ = space_app
    """Twelve requests, each with a fresh session and a made-up left-most X-Forwarded-For entry; HF's proxy adds
    the real address after it. The app counts them as the one address they are: a few are taken, the rest refused
    at once. A second visitor, who even writes the flooder's address first, is not counted with the flooder and
    gets an answer; every request taken is answered. (Before: the limit trusted the left-most entry, which the
    client writes, and all twelve were taken.)"""
    flooder = "198.51.100.7"
    requests_ = [(uuid.uuid4().hex, {"X-Forwarded-For": f"10.9.8.{i}, {flooder}"}) for i in range(12)]
    taken, refused = flood(space_url, requests_)
    victim = flood(space_url, [(uuid.uuid4().hex, {"X-Forwarded-For": f"{flooder}, 203.0.113.50"})])[0]
    print(f"12 fresh sessions with forged headers: {len(taken)} taken, {refused} refused")
    assert 1 <= len(taken) <= ONE_ADDRESS and refused == 12 - len(taken)
    results = all_answered(taken + victim)
    assert len(victim) == 1 and all(answered(r) for r in results), results


def test_session_less_calls_count_as_one_visitor(space_app):
    space_url, _ = space_app
    """The public /gradio_api/call/chat route carries no session, and Gradio gives each call its own: ten such
    calls from one client are one visitor, a few taken, the rest refused at once, and each taken one answered.
    (Before: each call was a visitor of its own, never counted.)"""
    taken, refused = flood(space_url, [(None, {}) for _ in range(10)])
    print(f"10 session-less calls: {len(taken)} taken, {refused} refused")
    assert 1 <= len(taken) <= ONE_VISITOR and refused == 10 - len(taken)
    assert all(answered(r) for r in all_answered(taken))


def test_owner_actions_off_a_space_are_for_this_machine_only(app_url):
    """`python app.py` bound to a public address with no admin token: a client from another machine (here: named
    by a proxy on this one, which uvicorn believes) cannot start the benchmark, which would hold the CPU; the
    machine's own client can (test_app_server's benchmark test). (Before: off a Space, anyone could.)"""
    r, read = join(app_url, "benchmark", [8, 1, ""], headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.ok, r.text
    kind, message = read()
    assert kind == "error" and "only on the machine" in str(message), (kind, message)


def test_clear_drops_a_reply_still_waiting_in_the_queue(space_app):
    space_url, _ = space_app
    """A visitor sends a message that waits in the queue behind another visitor's long replies, then presses
    Clear (through the page's own route, as the page does): when its turn comes, the cleared message is not
    answered, and the chat stays empty. (Before: the page's clear count is a state read when the reply runs, after
    Clear wrote it, so the cleared conversation came back.)"""
    mine = uuid.uuid4().hex  # (one reader per session: a session's stream gives each message once)
    ahead = [join(space_url, "chat", LONG, session=uuid.uuid4().hex)[1] for _ in range(2)]
    r, read_mine = join(
        space_url,
        "chat",
        ["Hello, who are you?", [], DEFAULT_SYSTEM, 16, 0.0, 0.95, False, None],
        session=mine,
    )
    assert r.ok, r.text
    cleared = requests.post(
        space_url + "gradio_api/run/predict",
        json={"data": [], "fn_index": fn_index(space_url, "clear_chat"), "session_hash": mine, "event_data": None,
              "trigger_id": None},
        timeout=30,
    )  # fmt: skip
    assert cleared.ok, cleared.text
    results = all_answered([*ahead, read_mine])
    assert all(answered(r) for r in results[:2]), results
    kind, data = results[2]
    assert kind == "complete" and not (isinstance(data[0], list) and data[0]), data


def test_a_long_chat_fits_a_model_whose_window_is_under_the_input_limit(space_app):
    space_url, _ = space_app
    """A model that reads 512 tokens, a chat of about 1,000 tokens and a reply of 64: the oldest turns are left out
    so that the prompt and the reply fit the window, the visitor is told, and the reply is whole. (Before: the
    prompt was cut at 1,024 tokens whatever the window, and the reply failed.)"""
    turn = "Tell me about ships and the sea and the old harbour. " * 4
    history = [
        {"role": r, "content": [{"type": "text", "text": turn}]}
        for _ in range(10)
        for r in ("user", "assistant")
    ]
    data = ["And now?", history, DEFAULT_SYSTEM, 64, 0.0, 0.95, False, None]
    r, read = join(space_url, "chat", data, session=uuid.uuid4().hex)
    assert r.ok, r.text
    kind, out = read()
    assert kind == "complete", out
    chat, notice = out[0], out[5]
    assert text_of(chat[-2]["content"]) == "And now?" and text_of(chat[-1]["content"]), chat[-1]
    assert "left out" in notice, notice


def test_a_reply_whose_cache_would_not_fit_is_refused_with_a_sentence(tiny_pairs, tmp_path):
    """Memory for the INT8 model and ~60 KB more (Q8CHAT_MEMORY_BYTES; BF16 does not fit, INT8 answers alone):
    a reply that would write 256 new tokens (~150 KB of cache) is not admitted, the visitor reads why and finds
    the message back in the box, and the app answers the next, small reply. (Before: every cache was allocated
    unchecked, and on an overcommitting kernel the OOM killer would end the app.)"""
    from quantize.runtime import engine

    bf16_dir, int8_dir = tiny_pairs["tiny-a"]
    int8_bytes = engine.load(int8_dir).weight_bytes
    env = dict(Q8CHAT_BF16_MODEL=str(bf16_dir), Q8CHAT_INT8_MODEL=str(int8_dir),
               Q8CHAT_MEMORY_BYTES=str(int8_bytes + 60_000))  # fmt: skip
    with running_app(tmp_path / "app-no-room-for-caches.log", **env) as (url, proc):
        big = ["Hello there", [], DEFAULT_SYSTEM, 256, 0.0, 0.95, False, None]
        kind, out = join(url, "chat", big, session=uuid.uuid4().hex)[1]()
        assert kind == "complete", out
        assert "Not answered" in out[5] and "MB of memory" in out[5], out[5]
        assert out[0] == [] and out[1] == "Hello there", out[:2]
        small = ["Hello there", [], DEFAULT_SYSTEM, 8, 0.0, 0.95, False, None]
        kind, out = join(url, "chat", small, session=uuid.uuid4().hex)[1]()
        assert kind == "complete" and text_of(out[0][-1]["content"]), out
        assert proc.poll() is None


def test_the_owners_token_opens_the_benchmark_and_shows_nowhere(space_app):
    """On a Space with Q8CHAT_ADMIN_TOKEN set: the benchmark is refused without it and with a near miss, runs with
    it, and the token is in no log line, no page, no API description, no answer."""
    url, log = space_app
    outcomes = []
    for token in ("", ADMIN_TOKEN[:-1], ADMIN_TOKEN):
        r, read = join(url, "benchmark", [8, 1, token])
        assert r.ok, r.text
        outcomes.append(read())
    assert [kind for kind, _ in outcomes] == ["error", "error", "complete"], outcomes
    assert "admin token" in str(outcomes[0][1]) and "Median ms / token" in str(outcomes[2][1])
    pages = [requests.get(url + p, timeout=30).text for p in ("", "config", "gradio_api/info")]
    for text in [log.read_text(), *pages, json.dumps(outcomes)]:
        assert ADMIN_TOKEN not in text and ADMIN_TOKEN[:-1] not in text
