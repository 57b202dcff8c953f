"""python -m quantize.tools.visitors URL --visitors 8 16 — many visitors at once through a running app, over HTTP.

For each count N: first one visitor alone, then N at the same moment, each asking a held-out chat prompt (greedy,
INT8, no comparison, --tokens new tokens) through the app's queue as a browser does. Per N it prints how many were
answered, refused (HTTP 429 or a full queue) and failed, the median and p95 time until a reply's first words show, and
the time until the last answer against one visitor's whole reply alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from quantize.maintainer.evaluate import heldout_prompts
from quantize.runtime.chat import text_of


def one_visitor(url: str, question: str, tokens: int) -> dict:
    """One visitor's reply as it streams: seconds to its first words on the page and to its end, or its error."""
    from gradio_client import Client

    start = time.perf_counter()
    try:
        job = Client(url, verbose=False).submit(question, [], "", tokens, 0.0, 0.95, False, api_name="/chat")
        first = None
        for update in job:  # the whole outputs each time; the chat's last message fills as tokens come
            chat = update[0]  # a list of messages, or {"__type__": "update"} where the chat did not change
            if first is None and isinstance(chat, list) and chat and text_of(chat[-1]["content"]):
                first = time.perf_counter() - start
        job.result(timeout=900)
    except Exception as e:  # noqa: BLE001 - counted: a refusal is an answer of the app, anything else an error
        refused = "429" in str(e) or "Queue is full" in str(e)
        return {"outcome": "refused" if refused else f"error: {e}"}
    return {"outcome": "answered", "first_s": first, "end_s": time.perf_counter() - start}


def at_once(url: str, questions: list[str], tokens: int) -> list[dict]:
    results: list = [None] * len(questions)
    go = threading.Barrier(len(questions))

    def run(i: int) -> None:
        go.wait()
        results[i] = one_visitor(url, questions[i], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(n: int, results: list[dict], alone: dict) -> dict:
    done = [r for r in results if r["outcome"] == "answered"]
    firsts = sorted(r["first_s"] for r in done)
    return {
        "visitors": n,
        "answered": len(done),
        "refused": sum(r["outcome"] == "refused" for r in results),
        "errors": [r["outcome"] for r in results if r["outcome"].startswith("error")],
        "ttft_p50_s": statistics.median(firsts) if firsts else None,
        "ttft_p95_s": firsts[round(0.95 * (len(firsts) - 1))] if firsts else None,
        "last_answer_s": max((r["end_s"] for r in done), default=None),
        "alone_s": alone.get("end_s"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m quantize.tools.visitors", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("url")
    p.add_argument("--visitors", type=int, nargs="+", default=[8, 16])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per reply (default 64)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    chats = heldout_prompts()
    figures = []
    for n in args.visitors:
        questions = [chats[i % len(chats)] for i in range(n)]
        alone = one_visitor(args.url, questions[0], args.tokens)
        figures.append(summary(n, at_once(args.url, questions, args.tokens), alone))
        print(json.dumps(figures[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"command": " ".join(["python -m quantize.tools.visitors", *sys.argv[1:]]), "runs": figures},
                f,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
