"""python -m quantize.tools.flood URL — what a script's flood costs another visitor, through a running app.

A victim asks one question (greedy, INT8, no comparison, --tokens new tokens) alone, then again while a script
floods the app in one of the ways a script can: --requests long replies, each from a fresh session behind a forged
left-most X-Forwarded-For (the app should run with SPACE_ID set: behind HF's proxy the real address is the right-most
entry), session-less through /gradio_api/call, and a POST to the direct /gradio_api/run route.
Per flood it prints how many of the script's requests were taken and refused, and the victim's time to its last
token against its time alone.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid

import requests

LONG = ["Write a very long story about a ship.", [], "", 256, 0.0, 0.95, False, None]


def fn_index(url: str) -> int:
    config = requests.get(url + "config", timeout=10).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")


def ask(url: str, data: list, session: str | None, headers: dict) -> tuple[int, threading.Thread | None]:
    """Joins the queue as a script does; returns the HTTP status and a thread reading the event to its end."""
    if session is None:
        r = requests.post(f"{url}gradio_api/call/chat", json={"data": data}, headers=headers, timeout=30)
        stream = f"{url}gradio_api/call/chat/{r.json()['event_id']}" if r.ok else None
        params = None
    else:
        body = {"data": data, "fn_index": fn_index(url), "session_hash": session, "event_data": None}
        r = requests.post(url + "gradio_api/queue/join", json=body, headers=headers, timeout=30)
        stream, params = url + "gradio_api/queue/data", {"session_hash": session}
    if not r.ok:
        return r.status_code, None
    reader = threading.Thread(target=read_to_end, args=(stream, params, r.json()["event_id"]), daemon=True)
    reader.start()
    return r.status_code, reader


def read_to_end(stream: str, params: dict | None, event: str) -> None:
    with requests.get(stream, params=params, stream=True, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith(b"event: complete") or line.startswith(b"event: error"):
                return
            if line.startswith(b"data:") and b"process_completed" in line and event.encode() in line:
                return


def victim(url: str, tokens: int) -> float:
    """Seconds from the victim's question to its last token, from an address of its own."""
    question = ["What is the capital of Japan?", [], "", tokens, 0.0, 0.95, False, None]
    start = time.perf_counter()
    status, reader = ask(url, question, uuid.uuid4().hex, {"X-Forwarded-For": "203.0.113.50"})
    if reader is None:
        raise SystemExit(f"the victim was refused: HTTP {status}")
    reader.join(900)
    return time.perf_counter() - start


FLOODS = {  # name: (session of request i or None, headers of request i)
    "fresh sessions, forged X-Forwarded-For": (
        lambda i: uuid.uuid4().hex,
        lambda i: {"X-Forwarded-For": f"10.9.8.{i}, 198.51.100.7"},
    ),
    "session-less /call": (lambda i: None, lambda i: {"X-Forwarded-For": "198.51.100.8"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    url = args.url.rstrip("/") + "/"
    alone = victim(url, args.tokens)
    rows = {"alone_s": round(alone, 2)}
    for name, (session, headers) in FLOODS.items():
        codes, readers = zip(*[ask(url, LONG, session(i), headers(i)) for i in range(args.requests)])
        wait = victim(url, args.tokens)
        rows[name] = {"taken": sum(c == 200 for c in codes), "refused": sum(c == 429 for c in codes),
                      "victim_s": round(wait, 2), "x_alone": round(wait / alone, 2)}  # fmt: skip
        print(name, rows[name], flush=True)
        for reader in readers:
            if reader is not None:
                reader.join(900)
    direct = requests.post(url + "gradio_api/run/chat", json={"data": LONG, "event_id": "x"}, timeout=30)
    rows["direct /run"] = {"status": direct.status_code, "victim_s": round(victim(url, args.tokens), 2)}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
