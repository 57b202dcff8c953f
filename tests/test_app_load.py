"""Many visitors and rude ones, over real HTTP against `python app.py` on the default model: 8 concurrent
gradio_client sessions, a burst beyond the queue, and a client that disconnects mid-stream."""

import json
import re
import statistics
import threading
import time
import uuid

import pytest
import requests
from conftest import ANSWER, ARTIFACTS, QUESTION, raw_call, wait_for

from app import DEFAULT_SYSTEM
from quantize.runtime.chat import text_of

pytestmark = pytest.mark.slow
BUSY = "Queue is full"  # Gradio's own answer when the bounded queue is full


def status(url: str) -> dict:
    from gradio_client import Client

    return Client(url, verbose=False).predict(api_name="/status")


def wait_idle(url: str, timeout: float) -> float:
    start = time.monotonic()
    while status(url)["busy"]:
        assert time.monotonic() - start < timeout, f"still generating after {timeout} s"
        time.sleep(0.2)
    return time.monotonic() - start


# Each visitor says their name in their first turn and asks it back in the next ones: the model answers from the
# conversation it was given (INT8 names the asker in 5 of 8, greedy, and makes up no name of this list: they are
# invented), so a reply decoded from another visitor's kept cache, or routed to another's stream, names another.
NAMES = ["Quilla", "Borvath", "Tesmira", "Dravik", "Ulsena", "Famrok", "Gretlin", "Hovanto"]


def visit(url: str, visitor: int, turns: range, history: list, log: list) -> list:
    """One visitor's conversation; appends (visitor, turn, seconds, outcome) to log and returns the history."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    for turn in turns:
        first = f"Hello, my name is {NAMES[visitor]}. Name a colour."
        message = first if turn == 0 else f"What is my name? (turn {turn})"
        start = time.monotonic()
        try:
            h, box, _chart, table, _bf16, notice, *_ = client.predict(
                message, history, DEFAULT_SYSTEM, 12, 0.0, 0.95, turn % 2 == 0, api_name="/chat"
            )
        except Exception as e:  # noqa: BLE001 - classified below: busy is an answer, anything else an error
            log.append((visitor, turn, time.monotonic() - start, "busy" if BUSY in str(e) else f"error: {e}"))
            continue
        # Never mixed between sessions: what comes back is this visitor's own history plus this exchange.
        texts = [(m["role"], text_of(m["content"])) for m in h]
        assert texts[:-2] == [(m["role"], text_of(m["content"])) for m in history], (visitor, turn)
        assert texts[-2] == ("user", message) and texts[-1][0] == "assistant" and texts[-1][1]
        others = [n for n in NAMES if n != NAMES[visitor] and n in texts[-1][1]]
        assert not others, (visitor, turn, texts[-1][1])  # an answer from another visitor's conversation
        assert box == "" and "Median ms / token" in table
        history = h
        log.append((visitor, turn, time.monotonic() - start, "answer"))
    return history


def settled_rss(server: dict) -> int:
    """The app process's resident bytes, read from outside it once it is idle (each reply gives its freed heap back
    to the OS as it ends: what is left resident is held, not cached free)."""
    import psutil

    wait_idle(server["url"], timeout=120)
    return psutil.Process(server["proc"].pid).memory_info().rss


# A leak of what a reply builds (its KV cache: at least 100 positions x 69 KB for the two default models, 4.6 MB
# for the INT8 one alone) grows the app by more than this per reply; the allocator's own drift, seen at 1-2 MB a
# reply over the first rounds, settles below it. What the app keeps on purpose, each visitor's conversation for
# their next turn, is bounded by its own budget (the test app's Q8CHAT_PREFIX_MB, conftest.PREFIX_MB), which
# every round of 8 visitors fills (8 replies x ~50 positions x 46 KB for INT8 alone): from the third round on,
# a kept cache comes in only as another goes, and the app must not grow.
LEAK_BYTES_PER_REPLY = 3e6


def test_eight_concurrent_sessions(app_server):
    app_url, visitors, turns = app_server["url"], 8, 6
    histories: list[list] = [[] for _ in range(visitors)]
    log: list = []

    def run_round(turn: int) -> None:
        def one(i: int) -> None:
            histories[i] = visit(app_url, i, range(turn, turn + 1), histories[i], log)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(visitors)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads), "a visitor never got an answer"
        wait_idle(app_url, 30)

    start = time.monotonic()
    rss = []
    for turn in range(turns):
        run_round(turn)
        rss.append(settled_rss(app_server))
    elapsed = time.monotonic() - start

    outcomes = [o for *_, o in log]
    errors = [o for o in outcomes if o.startswith("error")]
    waits = sorted(s for *_, s, o in log if o == "answer")
    # the trend over the rounds after two of warm-up, in bytes per reply (least squares)
    later = rss[2:]
    mean_x, mean_y = (len(later) - 1) / 2, statistics.mean(later)
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(later)) / sum(
        (i - mean_x) ** 2 for i in range(len(later))
    )
    figures = {
        "requests": len(log),
        "answers": outcomes.count("answer"),
        "busy": outcomes.count("busy"),
        "errors": len(errors),
        "p50_s": statistics.median(waits),
        "p95_s": waits[int(0.95 * (len(waits) - 1))],
        "rss_after_each_round_mb": [round(r / 1e6, 1) for r in rss],
        "rss_growth_per_reply_mb": slope / visitors / 1e6,
        "elapsed_s": elapsed,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load.json").write_text(json.dumps(figures, indent=1))
    print(figures)
    assert not errors, errors
    # 8 visitors are fewer than the queue holds: every request is answered, none turned away
    assert figures["answers"] == visitors * turns, figures
    assert all(len(h) == 2 * turns for h in histories)
    # no KV caches, histories or timings kept per reply beyond the kept conversations' budget
    assert slope / visitors < LEAK_BYTES_PER_REPLY, figures


def ttft_cells(table: str) -> list[str]:
    """The panel's time to first token, INT8's and BF16's."""
    row = next(line for line in table.splitlines() if line.startswith("| Time to first token"))
    return [c.strip() for c in row.split("|")[2:4]]


def test_a_visitors_next_turn_reads_only_what_is_new(app_url):
    """A visitor's second turn starts with their first exchange: both models keep its K and V, so the panel's
    time to first token says how many prompt tokens were kept, the same number for both (the comparison reads
    the same tokens on each). Another visitor sending the same conversation has nothing kept; both answers name
    the city."""
    from gradio_client import Client

    def turn(client, message: str, history: list) -> tuple[list, str, str]:
        h, _box, _chart, table, bf16, *_ = client.predict(
            message, history, DEFAULT_SYSTEM, 16, 0.0, 0.95, True, api_name="/chat"
        )
        return h, table, bf16

    visitor = Client(app_url, verbose=False)
    first, table, _ = turn(visitor, "Hello! Who are you?", [])
    assert not any("kept" in c for c in ttft_cells(table)), table
    second, table, bf16 = turn(visitor, QUESTION, first)
    kept = [re.fullmatch(r"\d+ \((\d+) kept\)", c) for c in ttft_cells(table)]
    assert all(kept), table  # INT8 and BF16 both read only the new part
    int8_kept, bf16_kept = (int(k.group(1)) for k in kept)
    assert int8_kept == bf16_kept > 20, table  # at least the system prompt and the first message
    assert "prefix reuse" in table
    _h, afresh_table, afresh_bf16 = turn(Client(app_url, verbose=False), QUESTION, first)
    assert not any("kept" in c for c in ttft_cells(afresh_table)), afresh_table
    answers = [text_of(second[-1]["content"]), bf16, text_of(_h[-1]["content"]), afresh_bf16]
    assert all(ANSWER in a for a in answers), answers


# Eight visitors' questions, each with a short, confident greedy answer from the default model
COUNTRIES = ("Japan", "France", "Italy", "Spain", "Germany", "Egypt", "Canada", "Peru")
EIGHT = [f"What is the capital of {c}? Answer in one word." for c in COUNTRIES]


def ask(url: str, question: str, tokens: int = 16) -> tuple[str, str]:
    """One visitor's question (INT8, no comparison): the answer and the panel's table."""
    from gradio_client import Client

    h, _box, _chart, table, *_ = Client(url, verbose=False).predict(
        question, [], DEFAULT_SYSTEM, tokens, 0.0, 0.95, False, api_name="/chat"
    )
    return text_of(h[-1]["content"]), table


def others_in_steps(table: str) -> str:
    """What the panel's table says of the replies that shared this one's steps (INT8's column)."""
    row = next(line for line in table.splitlines() if line.startswith("| Other replies in its steps"))
    return row.split("|")[2].strip()


def test_eight_visitors_at_once_get_their_own_answers(app_server):
    """Eight API clients ask at the same moment; each gets the answer to its own question: its country named,
    no other visitor's. Most are word for word what the question gets alone (greedy), but not all need be: in a
    batch each row's activation codes are the ones it gets alone, while the float rescale around the integer GEMM
    rounds differently in the last bits, and this model is chaotic under INT8 noise (see
    test_a_prompt_in_one_pass_gives_its_token_by_token_logits). Stated tolerance: at least half word for word
    (measured on an Intel Xeon: 7 and 6 of 8; the others took another turn at a near tie). The panel says the
    replies shared their steps, and the app holds no more memory after them than before (within 5%)."""
    url = app_server["url"]
    alone = [ask(url, q) for q in EIGHT]
    assert all(others_in_steps(t) == "0" for _, t in alone)
    before = settled_rss(app_server)
    together: list = [None] * len(EIGHT)
    start = threading.Barrier(len(EIGHT))

    def one(i: int) -> None:
        start.wait()
        try:
            together[i] = ask(url, EIGHT[i])
        except Exception as e:  # noqa: BLE001 - shown by the assertion below
            together[i] = (repr(e), "")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(EIGHT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    after = settled_rss(app_server)
    answers = [a for a, _ in together]
    named = [{c for c in COUNTRIES if c in a} for a in answers]
    assert named == [{c} for c in COUNTRIES], answers  # each its own question's, none another's
    same = sum(a == b for a, (b, _) in zip(answers, alone))
    print(f"{same} of 8 answers word for word as alone: {list(zip(answers, [b for b, _ in alone]))}")
    assert same >= 4, list(zip(answers, [b for b, _ in alone]))
    shared = [int(others_in_steps(t)) for _, t in together]
    assert max(shared) >= 1, shared  # decoded together: the panel counts the others in its steps
    assert after <= 1.05 * before, (before, after)


def test_one_client_flooding_the_queue_leaves_room_for_others(app_url):
    """One client starts a long reply and sends 20 more requests at once: beyond the few one visitor may have
    waiting or running, its requests are refused at once (HTTP 429, with a sentence), not queued, so a second
    visitor who asks meanwhile gets a place and an answer; every request that was taken is answered, none errors.
    (Before: the flood took the queue's 16 places and the second visitor was told the queue is full.)"""
    from gradio_client import Client

    flooder, other = Client(app_url, verbose=False), Client(app_url, verbose=False)
    jobs = [
        flooder.submit("Write a long story about a ship.", [], "", 256, 0.0, 0.95, False, api_name="/chat")
    ]
    wait_for(lambda: status(app_url)["busy"], 60, "the long reply to hold the CPU")
    jobs += [
        flooder.submit(f"Count to {i}.", [], "", 8, 0.0, 0.95, False, api_name="/chat") for i in range(20)
    ]
    mine = other.submit(QUESTION, [], DEFAULT_SYSTEM, 16, 0.0, 0.95, False, api_name="/chat")
    assert ANSWER in text_of(mine.result(timeout=600)[0][-1]["content"])
    taken = refused = 0
    for job in jobs:
        try:
            history, *_ = job.result(timeout=600)
            assert history[-1]["role"] == "assistant"
            taken += 1
        except Exception as e:  # noqa: BLE001 - a refusal is what is counted; anything else fails below
            assert "429" in str(e), repr(e)
            refused += 1
    print(f"a flood of {len(jobs)} from one client: {taken} taken and answered, {refused} refused at once")
    assert 1 <= taken <= 4 and taken + refused == len(jobs)
    wait_idle(app_url, 30)


def test_one_visitors_stop_leaves_anothers_reply_alone(app_url, app_server):
    """Bob presses Stop while Alice's reply streams: Alice's reply is the one she gets without Bob (greedy, so
    the same text), and the log has no stopped reply."""
    from gradio_client import Client

    def ask(client):
        return client.submit(
            "Tell me about the moon.", [], DEFAULT_SYSTEM, 128, 0.0, 0.95, False, api_name="/chat"
        )

    alone = text_of(ask(Client(app_url, verbose=False)).result(timeout=300)[0][-1]["content"])
    wait_idle(app_url, 30)
    stops_before = app_server["log"].read_text().count("(stopped")
    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    job = ask(alice)
    while not job.outputs():  # Alice's reply has started streaming
        assert not job.done(), "Alice's reply ended before Bob could press Stop"
        time.sleep(0.02)
    bob.predict(api_name="/stop")
    with_bob = text_of(job.result(timeout=300)[0][-1]["content"])
    assert with_bob == alone
    assert app_server["log"].read_text().count("(stopped") == stops_before


def app_cpu_seconds(server: dict) -> float:
    """CPU time the app process has used, all its threads, read from outside it."""
    import psutil

    times = psutil.Process(server["proc"].pid).cpu_times()
    return times.user + times.system


def test_disconnect_mid_stream_stops_generation(app_url, app_server):
    """A browser tab closed while a long reply streams: the app stops generating. Observed from outside the app,
    as the CPU time it spends on the request: the same request costs it several times more when its visitor stays
    to the end (256 INT8 tokens, then the BF16 rerun)."""
    data = ["Write a very long story about a ship.", [], DEFAULT_SYSTEM, 256, 0.0, 0.95, True, None]
    before = app_cpu_seconds(app_server)
    raw_call(app_url, "chat", data)  # a visitor who stays
    wait_idle(app_url, 60)
    stayed = app_cpu_seconds(app_server) - before

    config = requests.get(app_url + "config", timeout=10).json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")
    session = uuid.uuid4().hex
    before = app_cpu_seconds(app_server)
    r = requests.post(
        app_url + "gradio_api/queue/join",
        timeout=10,
        json={"data": data, "fn_index": fn, "session_hash": session, "event_data": None, "trigger_id": None},
    )
    assert r.ok, r.text
    stream = requests.get(
        app_url + "gradio_api/queue/data", params={"session_hash": session}, stream=True, timeout=60
    )
    streamed = 0
    for line in stream.iter_lines():
        if b"process_generating" in line:
            streamed += 1
            if streamed >= 3:  # the emptied box, then about two page refreshes (chat.UI_INTERVAL_S each)
                break
    stream.close()  # the visitor leaves
    assert streamed >= 3
    wait_idle(app_url, 120)
    left = app_cpu_seconds(app_server) - before
    print(
        f"CPU seconds for one long request: {stayed:.1f} when the visitor stays, {left:.1f} when they leave"
    )
    assert left < stayed / 3, (left, stayed)
