"""Q8-Chat — chat with an INT8 (SmoothQuant) LLM on a plain CPU, and see per token what INT8 buys over BF16.

Run: `python app.py` (offline: the embedded default model; the INT8 copy is built on first start and cached, and
BF16 answers meanwhile). Models are configured in the environment: see quantize/serving.py. Gradio's own
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT apply.
"""

from __future__ import annotations

import html
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import torch

from quantize import latency, serving
from quantize.chat import (
    UI_INTERVAL_S,
    Reply,
    as_markdown,
    build_prompt,
    clean,
    continuation_ids,
    decode_live,
    text_of,
)
from quantize.generate import Sampling

log = logging.getLogger("q8chat")
ASSETS = Path(__file__).parent / "assets"

MAX_MESSAGE_CHARS = 4000  # one message; longer ones are refused with the text kept in the box
MAX_NEW_TOKENS = 256
QUEUE_SIZE = 16
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
STATE = serving.Serving(serving.configured_pairs())
UI = SimpleNamespace()  # the page's components, filled by build_ui; handlers name their outputs through it


# ---------------------------------------------------------------- the side panel


def chart_update(int8: Reply | None, bf16: Reply | None) -> gr.LinePlot:
    """Per-token decode time of each model (token k's point is the gap since token k-1), on whole tokens; the
    first token's time, TTFT, is the title."""
    rows, ttft = [], []
    for name, r in (("INT8", int8), ("BF16", bf16)):
        if r is not None and len(r.timing.stamps) > 1:
            rows += [{"token": i + 2, "ms": ms, "model": name} for i, ms in enumerate(r.timing.decode_ms)]
            ttft.append(f"{name} {r.timing.ttft_ms:.0f} ms")
        else:  # an empty point, so both models are in the legend: the plot keeps its first color domain
            rows.append({"token": 1, "ms": float("nan"), "model": name})
    last = max(row["token"] for row in rows)
    return gr.LinePlot(
        pd.DataFrame(rows),
        x_lim=[1, max(last, 12)],
        title=("TTFT " + " · ".join(ttft)) if ttft else None,
    )


def _cell(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def table_md(a: dict | None, b: dict | None, state: serving.Serving = STATE, spread: bool = False) -> str:
    a, b = a or {}, b or {}
    speedup = (b["median_ms"] / a["median_ms"]) if a.get("median_ms") and b.get("median_ms") else None
    rows = [
        ("Time to first token (ms)", _cell(a.get("ttft_ms"), ".0f"), _cell(b.get("ttft_ms"), ".0f")),
        ("Median ms / token", _cell(a.get("median_ms"), ".1f"), _cell(b.get("median_ms"), ".1f")),
        ("p90 ms / token", _cell(a.get("p90_ms"), ".1f"), _cell(b.get("p90_ms"), ".1f")),
        ("Tokens / s", _cell(a.get("tokens_per_s"), ".1f"), _cell(b.get("tokens_per_s"), ".1f")),
        ("Tokens generated", _cell(a.get("tokens"), "d"), _cell(b.get("tokens"), "d")),
        (
            "Weights (MB)",
            _cell(state.int8.weight_bytes / 1e6 or None, ".0f"),
            _cell(state.bf16.weight_bytes / 1e6 or None, ".0f"),
        ),
        (
            "Resident memory (MB)",
            _cell(state.int8.rss_bytes / 1e6 or None, ".0f"),
            _cell(state.bf16.rss_bytes / 1e6 or None, ".0f"),
        ),
    ]
    if spread:
        rows.insert(3, ("p10 ms / token", _cell(a.get("p10_ms"), ".1f"), _cell(b.get("p10_ms"), ".1f")))
    lines = ["| | INT8 | BF16 |", "|---|---:|---:|"] + [f"| {r} | {x} | {y} |" for r, x, y in rows]
    verdict = (
        f"**INT8 is {speedup:.2f}x {'faster' if speedup >= 1 else 'slower'} per token** than BF16"
        if speedup
        else "Speed-up appears once both models have answered."
    )
    if state.int8.decoder is None and state.int8.error is None and state.ready:
        verdict = "INT8 is not ready yet: BF16 answers while it is built. The comparison starts once it is."
    elif not state.compare_available:
        verdict = "Comparison unavailable: only one model is loaded."
    return verdict + "\n\n" + "\n".join(lines)


def panel(int8: Reply | None, bf16: Reply | None) -> dict:
    summary = [r.timing.summary() if r is not None else None for r in (int8, bf16)]
    return {UI.chart: chart_update(int8, bf16), UI.table: table_md(*summary)}


def live_line(label: str, reply: Reply, done: bool = False) -> str:
    """The counters under the chat while a reply streams: tokens, tokens/s, context used of the model's window."""
    s = reply.timing.summary()
    rate = f"{s['tokens_per_s']:.1f} tokens/s" if s["tokens_per_s"] else "– tokens/s"
    used = reply.prompt_tokens + len(reply.token_ids)
    window = f" of {STATE.window:,}" if STATE.window else ""
    return f"**{label}** {'answered' if done else 'writing'} · {s['tokens']} tokens · {rate} · context {used:,}{window}"


# ---------------------------------------------------------------- the race


def race_md(name: str, reply: Reply, seconds: float) -> str:
    """One lane of the race: the answer as it stood `seconds` into the measured run."""
    finished = seconds >= reply.seconds
    clock = f"finished at {reply.seconds:.2f} s" if finished else f"{seconds:.2f} s"
    return f"**{name}** · {clock}\n\n{reply.text_at(STATE.tokenizer, seconds)}"


def replay_race(race: dict | None):
    """Replays both answers at their measured time stamps (a replay of what was timed, not a new run). Frames
    go out every UI_INTERVAL_S and at each model's finishing time, so a lane ends when its model did."""
    if not race:
        gr.Warning("The race needs both answers: send a message with the BF16 comparison on.")
        return
    ends = sorted(r.seconds for r in race.values())
    start = time.perf_counter()
    while True:
        t = time.perf_counter() - start
        yield {UI.race_int8: race_md("INT8", race["INT8"], t), UI.race_bf16: race_md("BF16", race["BF16"], t)}
        if t >= ends[-1]:
            return
        next_end = min([e for e in ends if e > t], default=ends[-1])
        time.sleep(max(0.0, min(t + UI_INTERVAL_S, next_end) - (time.perf_counter() - start)))


# ---------------------------------------------------------------- chat


@dataclass
class Run:
    """One visitor's generation in progress: Stop and Clear reach it through the session's entry in RUNS."""

    stop: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # Clear: end without showing anything more


RUNS: dict[str, Run] = {}
MAX_SESSIONS_REMEMBERED = 10_000
CLEARS: dict[
    str, int
] = {}  # per session, how many times Clear was pressed: replies asked for before are dropped

# The sliders' ranges. Gradio refuses API values outside them with its own sentence ("Value 300 is greater than
# maximum value 256."); read_settings clamps again for callers that bypass the sliders.
SETTINGS = {"max_new_tokens": (8, MAX_NEW_TOKENS), "temperature": (0.0, 1.5), "top_p": (0.05, 1.0)}


class Refused(ValueError):
    """A request the app will not run; the message is the sentence the visitor sees."""


def read_settings(max_new_tokens, temperature, top_p) -> tuple[Sampling, list[str]]:
    """Sampling from what the page or an API client sent. Out-of-range numbers are brought into range and the
    visitor told; what is not a number at all is refused (ValueError) with a sentence."""
    values, notes = {}, []
    for name, raw in zip(SETTINGS, (max_new_tokens, temperature, top_p)):
        lo, hi = SETTINGS[name]
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number between {lo} and {hi}, not {raw!r}.") from None
        if v != v:  # NaN
            raise ValueError(f"{name} must be a number between {lo} and {hi}, not NaN.")
        if not lo <= v <= hi:
            notes.append(f"{name} {raw} is outside [{lo}, {hi}]; used {min(max(v, lo), hi):g}.")
        values[name] = min(max(v, lo), hi)
    sampling = Sampling(
        max_new_tokens=int(values["max_new_tokens"]),
        temperature=values["temperature"],
        top_p=values["top_p"],
        seed=int(time.time()),
    )
    return sampling, notes


def check_history(history) -> list[dict]:
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(m, dict) and "role" in m for m in history):
        raise Refused("The chat history must be a list of {role, content} messages.")
    if not STATE.ready:
        raise Refused(STATE.status or "The models are still loading; try again in a moment.")
    return list(history)


def check_message(message, history: list[dict], system) -> tuple[str, list[int], str]:
    """(text, prompt ids, notice) for a new message, or Refused with the sentence to show."""
    text = clean(message)
    if not text:
        raise Refused("Type a message first.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise Refused(
            f"That message has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. "
            "Shorten it — your text is still in the box."
        )
    try:
        ids, dropped = build_prompt(STATE.tokenizer, system if isinstance(system, str) else "", history, text)
    except ValueError as e:
        raise Refused(f"{e} Your text is still in the box.") from None
    note = (
        (
            f"The conversation is longer than the model's window: the {dropped} oldest messages were left out "
            "of this prompt."
        )
        if dropped
        else ""
    )
    return text, ids, note


def refusal(why: str, history, message) -> dict:
    """The reason as a toast and under the chat; the history and the typed text are kept as they were."""
    gr.Warning(why)
    return {
        UI.chatbot: history if isinstance(history, list) else [],
        UI.box: message,
        UI.notice: "Not sent: " + why,
    }


def dropped_by_clear(clears, request) -> bool:
    """A reply still queued when its visitor pressed Clear is not started."""
    session = getattr(request, "session_hash", None)
    return bool(session) and (clears or 0) < CLEARS.get(session, 0)


def respond(
    message: str,
    history: list[dict],
    system: str,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    compare: bool,
    clears: int = 0,
    request: gr.Request = None,
):
    """A new message: checked, then answered by the chat model (INT8) and, for the comparison, by BF16.
    A refused message stays in the box."""
    if dropped_by_clear(clears, request):
        yield {}
        return
    try:
        history = check_history(history)
        sampling, adjusted = read_settings(max_new_tokens, temperature, top_p)
        text, ids, note = check_message(message, history, system)
    except (Refused, ValueError) as e:
        yield refusal(
            str(e) if isinstance(e, Refused) else f"{e} Your text is still in the box.", history, message
        )
        return
    notice = " ".join(f"Note: {n}" for n in adjusted + [note] if n)
    history += [{"role": "user", "content": as_markdown(text)}, {"role": "assistant", "content": ""}]
    yield from answer(history, ids, ids, sampling, compare, notice, request)


def continue_reply(
    history: list[dict],
    last_prompt: list[int] | None,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    compare: bool,
    clears: int = 0,
    request: gr.Request = None,
):
    """Continue: the model picks up the last answer where it stopped, and the answer grows in place."""
    if dropped_by_clear(clears, request):
        yield {}
        return
    try:
        history = check_history(history)
        sampling, _ = read_settings(max_new_tokens, temperature, top_p)
        if not last_prompt or not history or history[-1]["role"] != "assistant":
            raise Refused("Nothing to continue: send a message first.")
        ids = continuation_ids(STATE.tokenizer, last_prompt, text_of(history[-1]["content"]))
    except (Refused, ValueError) as e:
        yield refusal(str(e), history, gr.skip())
        return
    yield from answer(history, ids, last_prompt, sampling, compare, "", request)


STOPPED = {
    False: "Stopped: BF16 was not run for this reply.\n\n",
    True: "Stopped during the BF16 run: its numbers cover the tokens it produced.\n\n",
}


def answer(
    history: list[dict],
    ids: list[int],
    prompt: list[int],
    sampling: Sampling,
    compare: bool,
    notice: str,
    request: gr.Request | None,
):
    """Streams the chat model's answer into the last message (after what it already says), then BF16's answer
    to the same ids for the comparison, then the panel and the race of the two."""
    session = getattr(request, "session_hash", None) or f"anon-{time.monotonic_ns()}"
    prefix = text_of(history[-1]["content"])
    model, run = STATE.chat_model(), Run()
    with STATE.lock:  # one generation at a time: both models share the CPU
        RUNS[session] = run
        try:
            yield {UI.box: "", UI.notice: notice, UI.last_prompt: prompt}
            first = yield from stream_one(model, ids, sampling, run, history, prefix)
            if run.abandoned:  # Clear: our last word agrees with Clear's, whichever reaches the page last
                yield dict(zip(UI.cleared, cleared()))
                return
            int8 = first if model is STATE.int8 else None
            bf16, compared = (None if int8 else first), False
            if not run.stop.is_set() and compare and STATE.compare_available and int8:
                running = "Running the same prompt on BF16…\n\n" + table_md(int8.timing.summary(), None)
                yield {**panel(int8, None), UI.table: running}
                bf16, compared = (yield from stream_one(STATE.bf16, ids, sampling, run)), True
                if run.abandoned:
                    yield dict(zip(UI.cleared, cleared()))
                    return
            out = panel(int8, bf16) | {
                UI.chatbot: history,
                UI.box: "",
                UI.notice: notice,
                UI.bf16_text: bf16.text if compared else "",
                UI.live: live_line(model.label, first, done=True),
            }
            if run.stop.is_set():
                out[UI.table] = STOPPED[compared] + out[UI.table]
            if int8 and compared:
                out |= {
                    UI.race: {"INT8": int8, "BF16": bf16},
                    UI.race_int8: race_md("INT8", int8, int8.seconds),
                    UI.race_bf16: race_md("BF16", bf16, bf16.seconds),
                }
            yield out
        finally:
            if RUNS.get(session) is run:
                del RUNS[session]


def stream_one(
    model: serving.LoadedModel,
    ids: list[int],
    sampling: Sampling,
    run: Run,
    history: list[dict] | None = None,
    prefix: str = "",
):
    """Streams one model's reply: into the chat's last message (`history`), or into the BF16 answer box.
    Returns the Reply; the live counters follow it."""
    reply, why = None, ""
    try:
        for reply in decode_live(model.decoder, STATE.tokenizer, ids, sampling, run.stop):
            if run.abandoned:
                break
            out = {UI.live: live_line(model.label, reply)}
            if history is not None:
                history[-1] = {"role": "assistant", "content": as_markdown(prefix + reply.text)}
                out[UI.chatbot] = history
            else:
                out[UI.bf16_text] = reply.text
            yield out
        why = " (stopped)" if run.stop.is_set() else ""
    except GeneratorExit:  # Gradio closes us when the visitor disconnects; decode_live has stopped the model
        why = " (stopped: visitor left)"
        raise
    finally:
        log.info("reply: %d tokens on %s%s", len(reply.token_ids) if reply else 0, model.label, why)
    if reply is not None and not run.abandoned:
        yield {UI.live: live_line(model.label, reply, done=True)}
    return reply


def stop_run(request: gr.Request) -> None:
    """Stop this visitor's generation where it is; what was written stays, the panel shows its numbers."""
    run = RUNS.get(request.session_hash)
    if run is not None:
        run.stop.set()


# Cleared by data, not by hiding: toggling a Gradio 6 plot's visibility while it renders throws in the page.
CHART_COLORS = {"INT8": "#4f46e5", "BF16": "#d97706"}
PANEL_PLACEHOLDER = "Send a message to see INT8 and BF16 side by side."


def clear_run(request: gr.Request):
    """Stop this visitor's generation and empty the chat at once; replies still waiting in the queue are
    dropped. A second, queued step (`cleared`) repeats the emptying after the stopped run's last update, so a
    late streamed update cannot bring the old chat back."""
    CLEARS[request.session_hash] = CLEARS.get(request.session_hash, 0) + 1
    if (
        len(CLEARS) > MAX_SESSIONS_REMEMBERED
    ):  # bounded (demo.unload would do it, but breaks Gradio 6's Examples)
        CLEARS.pop(next(iter(CLEARS)))
    run = RUNS.get(request.session_hash)
    if run is not None:
        run.abandoned = True
        run.stop.set()
    return (*cleared(), "", CLEARS[request.session_hash])


def cleared() -> tuple:
    """The values of UI.cleared for an empty chat."""
    return [], "", "", chart_update(None, None), PANEL_PLACEHOLDER, "", None, "", ""


def retry(history: list[dict]):
    """Drop the last answer and hand its question back to be sent again."""
    history = list(history or [])
    while history and history[-1]["role"] == "assistant":
        history.pop()
    last = text_of(history.pop()["content"]) if history else ""
    return history, last


def example_text(picked: gr.SelectData) -> str:
    return picked.value["text"]


# ---------------------------------------------------------------- models and status


def status_html(state: serving.Serving = STATE) -> str:
    """The status line; during a first-start INT8 build, its stage and a progress bar."""
    bar = state.building
    line = f"<p>{html.escape(state.status)}</p>" if state.status else ""
    if bar is None or not bar.total:
        return line
    stage = min(bar.n + 1, bar.total)
    return (
        f'{line}<progress value="{bar.n}" max="{bar.total}"></progress> '
        f"<span>stage {stage} of {bar.total}: {html.escape(bar.desc)}</span>"
    )


def poll(shown: str | None):
    """Every second: the header, the status and, when the chat has just moved to INT8, a notice under the chat
    (a toast would need a queued event, and a queued tick per page and second would crowd out the replies)."""
    label = STATE.chat_model().label if STATE.ready else None
    moved = bool(
        shown and label and label != shown and label.startswith("INT8") and not shown.startswith("INT8")
    )
    header = serving.header_text(STATE) if STATE.ready or STATE.status.startswith("No model") else ""
    notice = (
        "INT8 is ready: replies now come from the INT8 model, compared with BF16." if moved else gr.skip()
    )
    return header, status_html(), quality_md(), label, notice


def switch_pair(name: str):
    """Unload the current pair (after the reply in progress) and load the chosen one in the background."""
    if loading() or STATE.pair is None:
        gr.Warning("A model is still loading; choose again when it is ready.")
        return gr.Dropdown(value=STATE.pair.name if STATE.pair else None)
    if name == STATE.pair.name:
        return gr.skip()
    pair = next(p for p in STATE.pairs if p.name == name)
    with STATE.lock:
        serving.unload(STATE)
        STATE.status = f"Switching to {name}…"
    start_loading(pair)
    return gr.skip()


def loading() -> bool:
    """A pair is being loaded (or its INT8 copy built) in the background."""
    return any(t.name == "load-pair" for t in threading.enumerate())


def start_loading(pair: serving.Pair) -> None:
    threading.Thread(target=serving.load_pair, args=(STATE, pair), daemon=True, name="load-pair").start()


def quality_md(state: serving.Serving = STATE) -> str:
    r = state.report
    if not r:
        return "No quality report found next to the INT8 model."
    q = r["quality"]
    lines = [
        "| model | perplexity | x BF16 | top-1 agreement | chat top-1 agreement |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in q.items():
        lines.append(
            f"| {name} | {v['perplexity']:.2f} | {v['perplexity_ratio']:.3f} | "
            f"{v['top1_agreement']:.3f} | {v.get('chat_top1_agreement', float('nan')):.3f} |"
        )
    bar = r["quality_bar"]
    verdict = "meets" if bar["met"] else "does not meet"
    return (
        f"From the model card (measured by `python -m quantize` on {r['cpu']['model']}, {r['created']}): "
        f"the INT8 model {verdict} the quality bar (perplexity ≤ {bar['max_perplexity_ratio']}x, "
        f"top-1 ≥ {bar['min_top1_agreement']}).\n\n" + "\n".join(lines)
    )


# ---------------------------------------------------------------- benchmark tab

BENCH_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about a CPU.",
    "List three uses of a paperclip.",
]


def run_benchmark(new_tokens: float, rounds: float, progress=gr.Progress()):
    if not STATE.compare_available:
        raise gr.Error("The benchmark needs both models; the INT8 model is not loaded.")
    from quantize.chat import encode_chat

    prompts = [
        torch.tensor([encode_chat(STATE.tokenizer, [{"role": "user", "content": p}])]) for p in BENCH_PROMPTS
    ]
    total = int(rounds) * len(prompts) * 2

    class Bar:
        done = 0

        def update(self, n: int) -> None:
            Bar.done += n
            progress(Bar.done / total, desc="INT8 and BF16, interleaved")

    with STATE.lock:
        res = latency.interleaved(
            {"INT8": STATE.int8.decoder, "BF16": STATE.bf16.decoder},
            prompts,
            int(new_tokens),
            int(rounds),
            progress=Bar(),
        )
    m = res["models"]
    rows = [
        {"round": i + 1, "ms": v, "model": name}
        for name in m
        for i, v in enumerate(m[name]["round_median_ms"])
    ]
    summary = {
        n: {
            "median_ms": m[n]["median_ms"],
            "p10_ms": m[n]["p10_ms"],
            "p90_ms": m[n]["p90_ms"],
            "tokens_per_s": m[n]["tokens_per_s"],
            "ttft_ms": m[n]["ttft_median_ms"],
            "tokens": int(new_tokens),
        }
        for n in m
    }
    spread = (
        f"Speed-up per round: {', '.join(f'{r:.2f}x' for r in res['speedup_per_round'])} "
        f"(median {res['speedup_median']:.2f}x, {len(prompts)} prompts × {int(new_tokens)} tokens "
        f"× {int(rounds)} rounds, greedy)"
    )
    table = table_md(summary["INT8"], summary["BF16"], spread=True) + "\n\n" + spread
    return gr.LinePlot(pd.DataFrame(rows), visible=True), table


# ---------------------------------------------------------------- UI


def examples() -> list[str]:
    return json.loads((ASSETS / "examples.json").read_text())


def chat_column() -> None:
    UI.chatbot = gr.Chatbot(
        elem_id="chatbot",
        height=460,
        buttons=["copy"],
        feedback_options=None,
        show_label=False,
        examples=[{"text": e} for e in examples()],
        placeholder="Ask anything. The INT8 model answers; the panel shows how fast, next to BF16.",
    )
    UI.live = gr.Markdown(elem_id="live")
    UI.notice = gr.Markdown(elem_id="notice")
    with gr.Row():
        UI.box = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            scale=5,
            elem_id="message",
            max_lines=8,
            autofocus=True,
        )
        UI.send = gr.Button("Send", variant="primary", scale=1, elem_id="send", min_width=80)
    with gr.Row():
        UI.stop = gr.Button("Stop", elem_id="stop", size="sm")
        UI.resume = gr.Button("Continue", elem_id="continue", size="sm")
        UI.retry = gr.Button("Retry", elem_id="retry", size="sm")
        UI.clear = gr.Button("Clear", elem_id="clear", size="sm")
    with gr.Accordion("System prompt and generation settings", open=False):
        UI.system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2)
        UI.max_new = gr.Slider(*SETTINGS["max_new_tokens"], value=128, step=8, label="Max new tokens")
        UI.temperature = gr.Slider(
            *SETTINGS["temperature"], value=0.0, step=0.05, label="Temperature (0 = greedy)"
        )
        UI.top_p = gr.Slider(*SETTINGS["top_p"], value=0.95, step=0.05, label="Top-p")
        UI.compare = gr.Checkbox(True, label="After each reply, run BF16 on the same prompt")


def panel_column() -> None:
    names = [p.name for p in STATE.pairs]
    UI.model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model", interactive=len(names) > 1)
    gr.Markdown("### Per-token latency, this reply")
    UI.chart = gr.LinePlot(
        None,
        x="token",
        y="ms",
        color="model",
        elem_id="chart",
        height=260,
        x_title="token",
        y_title="ms per token",
        x_axis_format="d",
        color_map=CHART_COLORS,
    )
    UI.table = gr.Markdown(PANEL_PLACEHOLDER, elem_id="table")
    with gr.Accordion("The race: both answers replayed at their measured times", open=True, elem_id="race"):
        UI.race_run = gr.Button("Replay the race", size="sm", elem_id="race-run")
        with gr.Row():
            UI.race_int8 = gr.Markdown(elem_id="race-int8")
            UI.race_bf16 = gr.Markdown(elem_id="race-bf16")
    with gr.Accordion("BF16's answer to the same prompt", open=False):
        UI.bf16_text = gr.Markdown(elem_id="bf16-answer")


def benchmark_tab() -> None:
    gr.Markdown("Fixed prompts, greedy, INT8 and BF16 **interleaved** in one run; the ratio is per round.")
    with gr.Row():
        UI.b_tokens = gr.Slider(8, 64, value=32, step=8, label="New tokens per prompt")
        UI.b_rounds = gr.Slider(1, 5, value=2, step=1, label="Rounds")
        UI.b_run = gr.Button("Run benchmark", variant="primary", elem_id="run-bench")
    UI.b_chart = gr.LinePlot(
        None,
        x="round",
        y="ms",
        color="model",
        height=240,
        visible=False,
        y_title="median ms per token",
        elem_id="bench-chart",
    )
    UI.b_table = gr.Markdown(elem_id="bench-table")
    UI.quality = gr.Markdown(elem_id="quality")


def wire_chat() -> None:
    UI.clears, UI.last_prompt, UI.race = gr.State(0), gr.State(None), gr.State(None)
    UI.cleared = [
        UI.chatbot,
        UI.notice,
        UI.bf16_text,
        UI.chart,
        UI.table,
        UI.live,
        UI.race,
        UI.race_int8,
        UI.race_bf16,
    ]
    outputs = [
        UI.chatbot,
        UI.box,
        UI.chart,
        UI.table,
        UI.bf16_text,
        UI.notice,
        UI.live,
        UI.last_prompt,
        UI.race,
        UI.race_int8,
        UI.race_bf16,
    ]
    settings = [UI.max_new, UI.temperature, UI.top_p, UI.compare, UI.clears]
    message = [UI.box, UI.chatbot, UI.system, *settings]
    cpu = dict(
        concurrency_id="cpu", concurrency_limit=1
    )  # one CPU-bound job at a time: the models share cores
    UI.box.submit(respond, message, outputs, api_name="chat", **cpu)
    UI.send.click(respond, message, outputs, api_visibility="private", **cpu)
    UI.resume.click(
        continue_reply, [UI.chatbot, UI.last_prompt, *settings], outputs, api_name="continue", **cpu
    )
    UI.retry.click(retry, UI.chatbot, [UI.chatbot, UI.box], queue=False, api_visibility="private").then(
        respond, message, outputs, api_visibility="private", **cpu
    )
    # The chat's own examples (shown while it is empty): a click sends the example. (gr.Examples' Dataset
    # throws in the page when its input box is updated in quick succession, as Retry and Clear do.)
    UI.chatbot.example_select(example_text, None, UI.box, queue=False, api_visibility="private").then(
        respond, message, outputs, api_visibility="private", **cpu
    )
    # Stop and Clear end the run cooperatively (never a cancelled job): the worker stops at the next token,
    # the text so far stays, and the CPU is free at once.
    UI.stop.click(stop_run, None, None, queue=False, api_name="stop")
    UI.clear.click(
        clear_run, None, [*UI.cleared, UI.box, UI.clears], queue=False, api_visibility="private"
    ).then(cleared, None, UI.cleared, api_visibility="private", **cpu)
    UI.race_run.click(
        replay_race,
        UI.race,
        [UI.race_int8, UI.race_bf16],
        api_visibility="private",
        concurrency_id="race",
        concurrency_limit=8,
    )
    UI.b_run.click(
        run_benchmark, [UI.b_tokens, UI.b_rounds], [UI.b_chart, UI.b_table], api_name="benchmark", **cpu
    )
    UI.model.change(switch_pair, UI.model, UI.model, api_name="switch_model", **cpu)


def status() -> dict:
    """Whether a model answers, which, and what is loading; for clients and health checks."""
    return {
        "ready": STATE.ready,
        "status": STATE.status,
        "int8_error": STATE.int8.error,
        "bf16_error": STATE.bf16.error,
        "compare": STATE.compare_available,
        "busy": STATE.lock.locked(),
        "chat_model": STATE.chat_model().label if STATE.ready else None,
        "pair": STATE.pair.name if STATE.pair else None,
        "loading": loading(),
        "rss_bytes": serving.settled_rss(),
    }


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="Q8-Chat — INT8 vs BF16 on a CPU", fill_width=False) as demo:
        gr.Markdown(
            "# Q8-Chat\nChat with an **INT8** model; see what 8-bit quantization buys on this CPU.",
            elem_id="title",
        )
        header = gr.Markdown(elem_id="header")
        status_line = gr.HTML("<p>Starting…</p>", elem_id="status")
        with gr.Tab("Chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=320):
                    chat_column()
                with gr.Column(scale=2, min_width=300, elem_id="panel"):
                    panel_column()
        with gr.Tab("Benchmark"):
            benchmark_tab()
        wire_chat()
        gr.api(status, api_name="status")
        shown = gr.State(None)  # the chat model this page last showed, to notice the move to INT8
        ticks = [header, status_line, UI.quality, shown, UI.notice]
        gr.Timer(1.0).tick(poll, shown, ticks, queue=False, api_visibility="private")
        demo.load(poll, shown, ticks, queue=False, api_visibility="private")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serving.limit_malloc_arenas()
    start_loading(STATE.pairs[0])
    demo = build_ui()
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    on_space = bool(os.environ.get("SPACE_ID"))
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1"),
        theme=gr.themes.Soft(primary_hue="indigo", neutral_hue="slate"),
        css_paths=[ASSETS / "style.css"],
        show_error=True,  # API clients get Gradio's validation sentence, not 'an exception was raised'
        footer_links=["api"],
    )


if __name__ == "__main__":
    main()
