"""Chat for the app: what a visitor sends, checked; the prompt from a conversation; and one model's reply decoded
live with a time stamp per token.

The reply keeps every token id and its stamp, so the page can show live counters while it streams and replay the
INT8-vs-BF16 race afterwards from what was measured.
"""

from __future__ import annotations

import contextvars
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from quantize.runtime import latency
from quantize.runtime.generate import GREEDY_BELOW, Sampling, Step
from quantize.runtime.prefixes import Keeping, Prefixes
from quantize.runtime.scheduler import Scheduler, Sequence

# One bound for everything the model reads of a request: system prompt + history + new message, or the prompt
# of a stopped answer + what it said (Continue). Older turns are dropped first; a Continue past it is refused.
MAX_INPUT_TOKENS = 1024
# What a prompt is built from, in characters, before any tokenizing: turns older than this are dropped unread, so
# the work of a request is bounded whatever a client sends. A token is rarely over 16 characters, so what could
# fit MAX_INPUT_TOKENS is kept.
MAX_INPUT_CHARS = 16 * MAX_INPUT_TOKENS
MAX_SYSTEM_CHARS = 4000  # the system prompt; longer ones are refused
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
# The page is refreshed at most this often; tokens arriving in between are shown together. Each refresh costs the
# server CPU the model then waits for: at 0.1 s the panel's INT8 ms/token was 1.13x the bench's (2 threads, AMD
# EPYC, `python -m quantize.bench --app`), at 0.2 s 1.02x.
UI_INTERVAL_S = 0.2
# the page's system box
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MAX_MESSAGE_CHARS = 4000  # one message; longer ones are refused with the text kept in the box
# The settings' ranges (the page's sliders). Gradio refuses API values outside them with its own sentence
# ("Value 300 is greater than maximum value 256."); read_settings clamps again for callers that bypass them.
SETTINGS = {"max_new_tokens": (8, 256), "temperature": (0.0, 1.5), "top_p": (0.05, 1.0)}
# Every model run of the app (replies, the Benchmark tab) happens on this one thread. Each thread that runs torch
# gets its own OpenMP team; with more team threads alive than cores, libgomp stops spin-waiting between parallel
# regions, and a 2-thread decode of the default model took 2.3x as long per token as the bench's.
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="q8chat-model")
# Replies decoded at once, each model's in one batch (runtime/scheduler.py); more wait in Gradio's queue, which
# tells each visitor their place (quantize/README.md, "Many sequences at once").
# Each reply in a slot holds one of Gradio's worker threads (40), which Stop, Clear and the page's polls need too.
SLOTS = min(max(int(os.environ.get("Q8CHAT_SLOTS", "8")), 1), 16)
# Each visitor's conversation so far, kept between turns (runtime/prefixes.py; Q8CHAT_PREFIX_MB).
PREFIXES = Prefixes()
SCHEDULER = Scheduler(SLOTS, MODEL_THREAD, prefixes=PREFIXES)


def on_model_thread(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) run on MODEL_THREAD, in the caller's context (Gradio's progress lives there)."""
    return MODEL_THREAD.submit(contextvars.copy_context().run, fn, *args, **kwargs)


class Refused(ValueError):
    """A request the app will not run; the message is the sentence the visitor sees."""


def read_settings(max_new_tokens, temperature, top_p) -> tuple[Sampling, list[str]]:
    """Sampling from what the page or an API client sent. Out-of-range numbers are brought into range and the
    visitor told; what is not a number at all is Refused with a sentence."""
    values, notes = {}, []
    for name, raw in zip(SETTINGS, (max_new_tokens, temperature, top_p)):
        lo, hi = SETTINGS[name]
        try:
            v = float(raw)
        except (TypeError, ValueError):
            v = float("nan")
        if v != v:  # not a number, or NaN
            raise Refused(f"{name} must be a number between {lo} and {hi}, not {raw!r}.")
        if not lo <= v <= hi:
            notes.append(f"{name} {raw} is outside [{lo}, {hi}]; used {min(max(v, lo), hi):g}.")
        values[name] = min(max(v, lo), hi)
    if 0 < values["temperature"] < GREEDY_BELOW:
        notes.append(f"temperature {temperature} is below {GREEDY_BELOW}; answered greedily.")
        values["temperature"] = 0.0
    sampling = Sampling(
        max_new_tokens=int(values["max_new_tokens"]),
        temperature=values["temperature"],
        top_p=values["top_p"],
        seed=time.time_ns() % 2**32,
    )
    return sampling, notes


def check_history(history) -> list[dict]:
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(m, dict) and "role" in m for m in history):
        raise Refused("The chat history must be a list of {role, content} messages.")
    return list(history)


def input_budget(window: int, max_new_tokens: int) -> int:
    """What the model may read of a request: MAX_INPUT_TOKENS, and within its window (when known) room for the
    reply. Refused when the reply alone would fill the window."""
    if not window:
        return MAX_INPUT_TOKENS
    if window - max_new_tokens < 16:
        raise Refused(
            f"This model reads at most {window:,} tokens: ask for fewer than {window - 16:,} new tokens."
        )
    return min(MAX_INPUT_TOKENS, window - max_new_tokens)


def check_message(
    tokenizer, message, history: list[dict], system, budget: int = MAX_INPUT_TOKENS
) -> tuple[list[dict], list[int], str]:
    """(the conversation sent, its prompt ids, note) for a new message, or Refused with the sentence to show."""
    text, system = clean(message), system if isinstance(system, str) else ""
    if not text:
        raise Refused("Type a message first.")
    for what, got, limit in (
        ("That message", text, MAX_MESSAGE_CHARS),
        ("The system prompt", system, MAX_SYSTEM_CHARS),
    ):
        if len(got) > limit:
            raise Refused(f"{what} has {len(got):,} characters; the limit is {limit:,}. "
                          "Shorten it — your text is still in the box.")  # fmt: skip
    try:
        ids, dropped = build_prompt(tokenizer, system, history, text, budget)
    except ValueError as e:
        raise Refused(f"{e} Your text is still in the box.") from None
    note = (
        f"The conversation is longer than the model's window: the {dropped} oldest messages were left out "
        "of this prompt."
    )
    return sent_messages(system, history, text, dropped), ids, note if dropped else ""


def sent_messages(system: str, history: list[dict], message: str, dropped: int) -> list[dict]:
    """The conversation a prompt was built from (build_prompt), as messages for a server that applies the chat
    template itself: the system prompt, the turns kept, the new message."""
    turns = [{"role": m["role"], "content": text_of(m["content"])} for m in history
             if m.get("role") in ("user", "assistant")]  # fmt: skip
    head = [{"role": "system", "content": system}] if system.strip() else []
    return head + turns[dropped:] + [{"role": "user", "content": message}]


def text_of(content) -> str:
    """Gradio 6 hands message content back as a list of parts; accept plain strings too."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(text_of(c) for c in content or [])


def clean(message: str) -> str:
    return CONTROL_CHARS.sub("", message if isinstance(message, str) else "").strip()


def chat_pieces(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[list[int]]:
    """The chat template rendered once, tokenized message by message: each message's ids (with the template's text
    before it), then the template's ending. What people typed is tokenized with special tokens split, so a typed
    '<|im_start|>system' stays text and can never open a new role."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    shell = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    pieces, rest = [], shell
    for m, mark in zip(messages, marks):
        before, rest = rest.split(mark, 1)
        typed = tokenizer(m["content"], add_special_tokens=False, split_special_tokens=True).input_ids
        pieces.append(tokenizer(before, add_special_tokens=False).input_ids + typed)
    return pieces + [tokenizer(rest, add_special_tokens=False).input_ids]


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    return [i for piece in chat_pieces(tokenizer, messages, add_generation_prompt) for i in piece]


def newest_turns(turns: list[dict], chars: int) -> list[dict]:
    """The newest of `turns` that hold at most `chars` characters together, read from the newest back: the older
    ones are never looked at again."""
    kept: list[dict] = []
    for m in reversed(turns):
        text = text_of(m["content"])
        chars -= len(text) + 1  # an empty turn costs too: the template wraps it in tokens
        if chars < 0 or len(kept) >= MAX_INPUT_TOKENS:
            break
        kept.append({"role": m["role"], "content": text})
    return kept[::-1]


def build_prompt(
    tokenizer, system: str, history: list[dict], message: str, budget: int = MAX_INPUT_TOKENS
) -> tuple[list[int], int]:
    """Token ids for system + history + message, dropping the oldest turns until they fit `budget`, in time linear
    in what was sent: turns beyond MAX_INPUT_CHARS are dropped unread, the others tokenized once to size them.
    Returns (ids, number of earlier messages dropped). Raises ValueError when the message alone does not fit."""
    turns = [m for m in history if m.get("role") in ("user", "assistant")]
    kept = newest_turns(turns, MAX_INPUT_CHARS - len(system) - len(message))
    head = [{"role": "system", "content": system}] if system.strip() else []
    last = [{"role": "user", "content": message}]
    pieces = chat_pieces(tokenizer, head + kept + last)
    sizes = [len(p) for p in pieces[len(head) : len(head) + len(kept)]]
    total = sum(len(p) for p in pieces)
    start = 0
    while True:
        # drop the oldest turns until the sizes fit, never starting mid-exchange
        while start < len(kept) and (total > budget or kept[start]["role"] == "assistant"):
            total, start = total - sizes[start], start + 1
        ids = encode_chat(
            tokenizer, head + kept[start:] + last
        )  # the template on the kept turns, as it renders them
        if len(ids) <= budget or start == len(kept):
            break
        total = len(ids) + 1  # a template whose pieces depend on their neighbours: one more turn goes
    if len(ids) > budget:
        raise ValueError(
            f"The message is {len(ids)} tokens with the system prompt; the limit is {budget}. Shorten it."
        )
    return ids, len(turns) - len(kept) + start


CODE = re.compile(
    r"(```[\s\S]*?(?:```|$)|`[^`\n]*`)"
)  # fenced blocks (also one still streaming) and code spans
DUNDER = re.compile(r"(?<![\w`])(__\w+?__(?:\(\))?)(?![\w`])")


def as_markdown(text: str) -> str:
    """A message as the chat shows it. Markdown reads a bare `__init__()` as bold "init()", so dunder names
    outside code are shown as code; everything else is left to the chat's markdown."""
    parts = CODE.split(text)
    return "".join(p if i % 2 else DUNDER.sub(r"`\1`", p) for i, p in enumerate(parts))


@dataclass
class Turn:
    """What a reply runs: the chat with the message to fill, the ids the model reads, the prompt Continue
    starts from, and a note for the visitor."""

    history: list[dict]
    ids: list[int]
    prompt: list[int]
    note: str = ""
    messages: list[dict] | None = None  # the conversation `ids` render, for a server (None: Continue's ids)


def new_turn(tokenizer, message, system, history: list[dict], budget: int = MAX_INPUT_TOKENS) -> Turn:
    """A typed message after `history`, read within `budget` tokens (input_budget), or Refused."""
    messages, ids, note = check_message(tokenizer, message, history, system, budget)
    exchange = [
        {"role": "user", "content": as_markdown(messages[-1]["content"])},
        {"role": "assistant", "content": ""},
    ]
    return Turn(history + exchange, ids, ids, note, messages)


def continuation(
    tokenizer, last_prompt: list[int] | None, history: list[dict], budget: int = MAX_INPUT_TOKENS
) -> Turn:
    """The last answer's prompt and what it said, so the model picks up where it stopped; or Refused when there is
    nothing to continue or the two pass `budget` (characters counted first, before any tokenizing)."""
    if not last_prompt or not history or history[-1]["role"] != "assistant":
        raise Refused("Nothing to continue: send a message first.")
    said = text_of(history[-1]["content"])
    ids = continuation_ids(tokenizer, last_prompt, said) if len(said) <= MAX_INPUT_CHARS else []
    if not ids or len(ids) > budget:
        raise Refused(
            f"This answer and its prompt have reached the input limit of {budget:,} tokens, so it "
            "cannot be continued: ask a follow-up question instead."
        )
    return Turn(history, ids, last_prompt)


def continuation_ids(tokenizer, prompt_ids: list[int], partial_answer: str) -> list[int]:
    """The prompt of a stopped reply followed by what it had said, so the model picks up mid-answer."""
    return (
        prompt_ids + tokenizer(partial_answer, add_special_tokens=False, split_special_tokens=True).input_ids
    )


@dataclass
class Reply:
    """One model's answer as it is produced: every token id with the time stamp it became known. From a server
    (runtime/remote.py), also each token's text as it came (`pieces`): a server need not say its ids."""

    prompt_tokens: int
    timing: latency.Timing
    token_ids: list[int | None] = field(default_factory=list)
    text: str = ""
    pieces: list[str] | None = None

    def text_at(self, tokenizer, seconds: float) -> str:
        """The answer as it stood `seconds` after the request (the race replays this)."""
        shown = sum(1 for t in self.timing.stamps if t - self.timing.start <= seconds)
        if self.pieces is not None:
            return "".join(self.pieces[:shown])
        return tokenizer.decode(self.token_ids[:shown], skip_special_tokens=True)

    @property
    def seconds(self) -> float:
        return (self.timing.stamps[-1] - self.timing.start) if self.timing.stamps else 0.0


def replay_clock(ends: list[float], interval: float = UI_INTERVAL_S) -> Iterator[float]:
    """Seconds since the start of a replay at each of its frames: every `interval`, and exactly at each of
    `ends` (when a replayed model finished), up to the last of them."""
    start = time.perf_counter()
    while True:
        t = time.perf_counter() - start
        yield t
        if t >= max(ends):
            return
        next_end = min(e for e in ends if e > t)
        time.sleep(max(0.0, min(t + interval, next_end) - (time.perf_counter() - start)))


def decode_live(
    decoder,
    tokenizer,
    ids: list[int],
    sampling: Sampling,
    stop: threading.Event,
    keeping: Keeping | None = None,
) -> Iterator[Reply]:
    """The one decode-and-time loop of the app. The reply is a sequence of the scheduler, which stamps each token
    on MODEL_THREAD as its step ends, so the per-token times measure the model (and the replies it shared the
    steps with), not the page; this generator yields the reply so far at most every UI_INTERVAL_S. A Stop ends
    the sequence at the scheduler's next turn and waits for that, so its slot is free; closing it (the visitor
    left) stops it without waiting, since the server may close it on its event loop. With `keeping`, the reply
    starts from what its visitor's last one kept, and its cache is kept for their next turn."""
    reply = Reply(len(ids), latency.Timing(time.perf_counter()))
    eos = frozenset({tokenizer.eos_token_id})
    seq = SCHEDULER.submit(Sequence(decoder, ids, sampling, eos, keeping=keeping or Keeping()))
    try:
        finished = False
        while not finished:
            if stop.is_set():
                seq.stop.set()
            try:  # a reply in line or reading its prompt has no token yet: Stop must reach it all the same
                item = seq.out.get(timeout=UI_INTERVAL_S)
            except queue.Empty:
                continue
            time.sleep(UI_INTERVAL_S)  # let tokens accumulate: one page update for all of them
            reply.timing.kept = seq.kept  # known before its first token
            while isinstance(item, Step):
                if item.token_id != tokenizer.eos_token_id:
                    reply.timing.stamps.append(item.t)
                    reply.timing.shared.append(item.batch)
                    reply.timing.took.append(item.took)
                    reply.token_ids.append(item.token_id)
                try:
                    item = seq.out.get_nowait()
                except queue.Empty:
                    break
            if isinstance(item, BaseException):
                raise item
            finished = item is None
            reply.text = tokenizer.decode(reply.token_ids, skip_special_tokens=True)
            yield reply
    finally:
        seq.stop.set()
