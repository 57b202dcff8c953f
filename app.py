"""Q8-Chat — chat with an INT8 (SmoothQuant) LLM on a plain CPU, and see per token what INT8 buys over BF16.

Run: `python app.py` (offline: the embedded default model; the INT8 copy is built on first start and cached).
Configure with Q8CHAT_INT8_MODEL / Q8CHAT_BF16_MODEL (Hub id or folder), Q8CHAT_INT8_REVISION,
Q8CHAT_THREADS, and Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from quantize import latency, models
from quantize.generate import Sampling, stream

log = logging.getLogger("q8chat")
ASSETS = Path(__file__).parent / "assets"

MAX_MESSAGE_CHARS = 4000  # one message; longer ones are refused with the text kept in the box
MAX_INPUT_TOKENS = 1024  # prompt + history fed to the model; older turns are dropped first
MAX_NEW_TOKENS = 256
QUEUE_SIZE = 16
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


# ---------------------------------------------------------------- models

@dataclass
class Side:
    """One model of the comparison."""

    label: str
    model: torch.nn.Module | None = None
    weight_bytes: int = 0
    rss_bytes: int = 0  # resident memory added by loading it
    error: str | None = None


@dataclass
class Engine:
    status: str = "Starting…"
    ready: bool = False
    tokenizer: object = None
    int8: Side = field(default_factory=lambda: Side("INT8"))
    bf16: Side = field(default_factory=lambda: Side("BF16"))
    report: dict | None = None  # quantize_report.json of the INT8 folder, when it has one
    header: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def compare_available(self) -> bool:
        return self.int8.model is not None and self.bf16.model is not None

    def chat_side(self) -> Side:
        """INT8 when it loaded; BF16 alone otherwise (the comparison is then marked unavailable)."""
        return self.int8 if self.int8.model is not None else self.bf16


ENGINE = Engine()


def settled_rss() -> int:
    """Resident memory once temporaries of a load are freed (glibc keeps freed pages unless trimmed)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return latency.rss_bytes()


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Every reply decodes in a fresh worker thread, and glibc gives threads their own malloc arenas (up to 8 per
    core), each keeping freed KV-cache pages: resident memory then creeps up with traffic. Two arenas hold it
    flat (the same as MALLOC_ARENA_MAX=2, set before any thread starts)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def load_resident(side: Side, load) -> None:
    """Load a model and record the resident memory it adds, after one forward pass so that memory-mapped
    weights are actually paged in."""
    before = settled_rss()
    side.model = load()
    with torch.inference_mode():
        side.model.forward(torch.tensor([1, 2, 3]), side.model.new_cache(8))
    side.rss_bytes = max(settled_rss() - before, 0)
    side.weight_bytes = side.model.weight_bytes


def load_models(engine: Engine = ENGINE) -> None:
    """Runs in a background thread so the page is up (with this status) while models load or quantize."""
    torch.set_num_threads(int(os.environ.get("Q8CHAT_THREADS", os.cpu_count() or 1)))
    bf16_arg = os.environ.get("Q8CHAT_BF16_MODEL") or None
    int8_arg = os.environ.get("Q8CHAT_INT8_MODEL") or None
    try:
        engine.status = "Loading the BF16 model…"
        src = models.resolve_model(bf16_arg)
        engine.tokenizer = models.load_tokenizer(src)
        load_resident(engine.bf16, lambda: models.open_bf16(src))
        engine.bf16.label = f"BF16 · {bf16_arg or models.DEFAULT_MODEL_LABEL}"
    except Exception as e:  # noqa: BLE001 - any failure here must reach the page, not kill the app
        engine.bf16.error = str(e)
        log.exception("BF16 model failed to load")
    try:
        if int8_arg:
            engine.status = f"Loading the INT8 model {int8_arg}…"
            int8_dir = models.resolve_int8(int8_arg, revision=os.environ.get("Q8CHAT_INT8_REVISION") or None)
        else:
            int8_dir = models.default_int8_dir(bf16_arg)
            if not models.is_int8_folder(int8_dir):
                engine.status = ("First start: quantizing the model to INT8 with SmoothQuant (a few minutes on "
                                 "2 cores; cached afterwards)…")
                build_int8(bf16_arg, int8_dir)
        engine.status = "Loading the INT8 model…"
        load_resident(engine.int8, lambda: models.open_int8(int8_dir))
        revision = os.environ.get("Q8CHAT_INT8_REVISION") if int8_arg else None
        engine.int8.label = f"INT8 · {int8_arg or int8_dir.name}" + (f" @ {revision[:10]}" if revision else "")
        report = Path(int8_dir) / "quantize_report.json"
        engine.report = json.loads(report.read_text()) if report.is_file() else None
        if engine.tokenizer is None:
            engine.tokenizer = models.load_tokenizer(int8_dir)
    except Exception as e:  # noqa: BLE001
        engine.int8.error = str(e)
        log.exception("INT8 model failed to load")
    engine.header = header_text(engine)
    engine.ready = engine.chat_side().model is not None
    engine.status = "" if engine.ready else "No model could be loaded: " + (engine.bf16.error or "")


def build_int8(bf16_arg: str | None, out: Path) -> None:
    from quantize.__main__ import main as quantize_main

    argv = ["--out", str(out), "--skip-baseline", "--overwrite"] + (["--model", bf16_arg] if bf16_arg else [])
    if quantize_main(argv) != 0:
        raise models.ModelError("Building the INT8 model failed; see the server log.")


def header_text(engine: Engine) -> str:
    cpu = latency.describe_cpu()
    rec = (engine.report or {}).get("recipe") or {}
    recipe = (f"SmoothQuant alpha {rec.get('alpha')} · recipe `{rec.get('name')}`" if rec.get("smooth_quant")
              else "recipe unknown (no quantize_report.json)")
    served = " / ".join(dict.fromkeys(s.model.label for s in (engine.int8, engine.bf16) if s.model is not None))
    parts = [f"**Chat model:** {engine.chat_side().label}", f"**Compared with:** {engine.bf16.label}",
             f"**Recipe:** {recipe}", f"**Runs on:** {served}", f"**CPU:** {cpu.line()}"]
    head = " &nbsp;·&nbsp; ".join(parts)
    if engine.int8.error:
        head += f"\n\n**INT8 unavailable** — serving BF16 alone, comparison off. Reason: {engine.int8.error}"
    return head


# ---------------------------------------------------------------- prompts

def text_of(content) -> str:
    """Gradio 6 hands message content back as a list of parts; accept plain strings too."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(text_of(c) for c in content or [])


def clean(message: str) -> str:
    return CONTROL_CHARS.sub("", message if isinstance(message, str) else "").strip()


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Render the chat template, tokenizing what people typed with special tokens split, so a typed
    '<|im_start|>system' stays text and can never open a new role."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    shell = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)],
        tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    rest = shell
    for m, mark in zip(messages, marks):
        before, rest = rest.split(mark, 1)
        ids += tokenizer(before, add_special_tokens=False).input_ids
        ids += tokenizer(m["content"], add_special_tokens=False, split_special_tokens=True).input_ids
    return ids + tokenizer(rest, add_special_tokens=False).input_ids


def build_prompt(tokenizer, system: str, history: list[dict], message: str,
                 budget: int = MAX_INPUT_TOKENS) -> tuple[list[int], int]:
    """Token ids for system + history + message, dropping the oldest turns until they fit `budget`.
    Returns (ids, number of earlier messages dropped). Raises ValueError when the message alone does not fit."""
    turns = [{"role": m["role"], "content": text_of(m["content"])} for m in history
             if m.get("role") in ("user", "assistant")]
    head = [{"role": "system", "content": system}] if system.strip() else []
    for dropped in range(0, len(turns) + 1):
        kept = turns[dropped:]
        if kept and kept[0]["role"] == "assistant":  # never start mid-exchange
            continue
        ids = encode_chat(tokenizer, head + kept + [{"role": "user", "content": message}])
        if len(ids) <= budget:
            return ids, dropped
    raise ValueError(f"The message is {len(ids)} tokens with the system prompt; the limit is {budget}. Shorten it.")


# ---------------------------------------------------------------- the side panel

def panel(int8: latency.Timing | None, bf16: latency.Timing | None, engine: Engine = ENGINE):
    """(chart data, table markdown) for one reply."""
    rows = []
    for name, t in (("INT8", int8), ("BF16", bf16)):
        if t is not None:
            rows += [{"token": i + 2, "ms": ms, "model": name} for i, ms in enumerate(t.decode_ms)]
    chart = gr.LinePlot(pd.DataFrame(rows), visible=bool(rows))
    return chart, table_md(int8 and int8.summary(), bf16 and bf16.summary(), engine)


def _cell(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def table_md(a: dict | None, b: dict | None, engine: Engine = ENGINE, spread: bool = False) -> str:
    a, b = a or {}, b or {}
    speedup = (b["median_ms"] / a["median_ms"]) if a.get("median_ms") and b.get("median_ms") else None
    rows = [
        ("Time to first token (ms)", _cell(a.get("ttft_ms"), ".0f"), _cell(b.get("ttft_ms"), ".0f")),
        ("Median ms / token", _cell(a.get("median_ms"), ".1f"), _cell(b.get("median_ms"), ".1f")),
        ("p90 ms / token", _cell(a.get("p90_ms"), ".1f"), _cell(b.get("p90_ms"), ".1f")),
        ("Tokens / s", _cell(a.get("tokens_per_s"), ".1f"), _cell(b.get("tokens_per_s"), ".1f")),
        ("Tokens generated", _cell(a.get("tokens"), "d"), _cell(b.get("tokens"), "d")),
        ("Weights (MB)", _cell(engine.int8.weight_bytes / 1e6 or None, ".0f"),
         _cell(engine.bf16.weight_bytes / 1e6 or None, ".0f")),
        ("Resident memory (MB)", _cell(engine.int8.rss_bytes / 1e6 or None, ".0f"),
         _cell(engine.bf16.rss_bytes / 1e6 or None, ".0f")),
    ]
    if spread:
        rows.insert(3, ("p10 ms / token", _cell(a.get("p10_ms"), ".1f"), _cell(b.get("p10_ms"), ".1f")))
    lines = ["| | INT8 | BF16 |", "|---|---:|---:|"] + [f"| {r} | {x} | {y} |" for r, x, y in rows]
    verdict = (f"**INT8 is {speedup:.2f}x {'faster' if speedup >= 1 else 'slower'} per token** than BF16"
               if speedup else "Speed-up appears once both models have answered.")
    if not engine.compare_available:
        verdict = "Comparison unavailable: only one model is loaded."
    return verdict + "\n\n" + "\n".join(lines)


# ---------------------------------------------------------------- chat

UI_INTERVAL_S = 0.1  # the page is refreshed at most this often; tokens arriving in between are shown together


@dataclass
class Run:
    """One visitor's generation in progress: Stop and Clear reach it through the session's entry in RUNS."""

    stop: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # Clear: end without showing anything more


RUNS: dict[str, Run] = {}
MAX_SESSIONS_REMEMBERED = 10_000
CLEARS: dict[str, int] = {}  # per session, how many times Clear was pressed: replies asked for before are dropped


def decode_timed(model, ids: list[int], sampling: Sampling, timing: latency.Timing, stop: threading.Event):
    """The one decode-and-time loop of the app. The model runs in a worker thread that only stamps tokens, so
    the per-token times measure the model, not the page; this generator yields the answer so far at most every
    UI_INTERVAL_S. Closing it (a stop, a disconnect) stops the worker before returning, so the CPU is free."""
    tok = ENGINE.tokenizer
    steps: queue.SimpleQueue = queue.SimpleQueue()
    halt = threading.Event()  # ours, so that a normal end is not mistaken for the visitor's Stop

    def work() -> None:
        try:
            for step in stream(model, torch.tensor([ids]), sampling, eos_ids={tok.eos_token_id}, stop=halt):
                timing.stamps.append(step.t)
                steps.put(step.token_id)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            steps.put(e)
        finally:
            steps.put(None)

    worker = threading.Thread(target=work, daemon=True, name="decode")
    worker.start()
    out: list[int] = []
    try:
        finished = False
        while not finished:
            item = steps.get()
            if stop.is_set():
                halt.set()
            time.sleep(UI_INTERVAL_S)  # let tokens accumulate: one page update for all of them
            while True:
                if item is None:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                if item != tok.eos_token_id:
                    out.append(item)
                try:
                    item = steps.get_nowait()
                except queue.Empty:
                    break
            yield tok.decode(out, skip_special_tokens=True)
    finally:
        halt.set()
        worker.join()


# The sliders' ranges. Gradio refuses API values outside them with its own sentence ("Value 300 is greater than
# maximum value 256."); read_settings clamps again for callers that bypass the sliders.
SETTINGS = {"max_new_tokens": (8, MAX_NEW_TOKENS), "temperature": (0.0, 1.5), "top_p": (0.05, 1.0)}


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
    return Sampling(max_new_tokens=int(values["max_new_tokens"]), temperature=values["temperature"],
                    top_p=values["top_p"], seed=int(time.time())), notes


def respond(message: str, history: list[dict], system: str, max_new_tokens: float, temperature: float,
            top_p: float, compare: bool, clears: int = 0, request: gr.Request = None):
    """Streams (chatbot, textbox, chart, table, bf16 answer, notice). A refused message stays in the box.
    `clears` is the session's Clear count when the visitor asked: a reply still queued when Clear was pressed
    is not started."""
    session = getattr(request, "session_hash", None)
    if session and (clears or 0) < CLEARS.get(session, 0):
        yield (gr.skip(),) * 6
        return
    history = [] if history is None else history

    def refuse(why: str):
        """The reason as a toast and under the chat; the history and the typed text are kept as they were."""
        gr.Warning(why)
        return (history if isinstance(history, list) else []), message, gr.skip(), gr.skip(), gr.skip(), "⚠️ " + why

    if not isinstance(history, list) or not all(isinstance(m, dict) and "role" in m for m in history):
        yield refuse("The chat history must be a list of {role, content} messages.")
        return
    history = list(history)
    if not ENGINE.ready:
        yield refuse(ENGINE.status or "The models are still loading; try again in a moment.")
        return
    text = clean(message)
    if not text:
        yield refuse("Type a message first.")
        return
    if len(text) > MAX_MESSAGE_CHARS:
        yield refuse(f"That message has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. "
                     "Shorten it — your text is still in the box.")
        return
    try:
        sampling, adjusted = read_settings(max_new_tokens, temperature, top_p)
        ids, dropped = build_prompt(ENGINE.tokenizer, system if isinstance(system, str) else "", history, text)
    except ValueError as e:
        yield refuse(f"{e} Your text is still in the box.")
        return
    notes = adjusted + ([f"The conversation is longer than the model's window: the {dropped} oldest messages "
                         "were left out of this prompt."] if dropped else [])
    notice = " ".join(f"Note: {n}" for n in notes)
    history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    side = ENGINE.chat_side()
    run = Run()
    session = session or f"anon-{id(run)}"
    gone = False
    with ENGINE.lock:  # one generation at a time: both models share the CPU
        RUNS[session] = run
        try:
            timing = latency.Timing(time.perf_counter())
            for answer in decode_timed(side.model, ids, sampling, timing, run.stop):
                if run.abandoned:
                    break
                history[-1] = {"role": "assistant", "content": answer}
                yield history, "", gr.skip(), gr.skip(), gr.skip(), notice
            if run.abandoned:  # Clear: our last word agrees with Clear's, whichever reaches the page last
                yield [], "", gr.skip(), gr.skip(), "", ""
                return
            int8_timing = timing if side is ENGINE.int8 else None
            chart, table = panel(int8_timing, None if int8_timing else timing)
            if run.stop.is_set():
                yield history, "", chart, "Stopped: BF16 was not run for this reply.\n\n" + table, "", notice
                return
            yield history, "", chart, table, gr.skip(), notice
            if compare and ENGINE.compare_available:
                yield history, "", chart, "⏳ Running the same prompt on BF16…\n\n" + table, "", notice
                bf16_timing = latency.Timing(time.perf_counter())
                bf16_answer = ""
                for bf16_answer in decode_timed(ENGINE.bf16.model, ids, sampling, bf16_timing, run.stop):
                    if run.abandoned:
                        break
                    yield history, "", gr.skip(), gr.skip(), bf16_answer, notice
                if run.abandoned:
                    yield [], "", gr.skip(), gr.skip(), "", ""
                    return
                chart, table = panel(int8_timing, bf16_timing)
                if run.stop.is_set():
                    table = "Stopped during the BF16 run: its numbers cover the tokens it produced.\n\n" + table
                yield history, "", chart, table, bf16_answer, notice
        except GeneratorExit:  # Gradio closes us when the visitor disconnects; decode_timed has stopped the model
            gone = True
            raise
        finally:
            if RUNS.get(session) is run:
                del RUNS[session]
            log.info("reply: %d tokens on %s%s", len(timing.stamps), side.label,
                     " (stopped: visitor left)" if gone else " (stopped)" if run.stop.is_set() else "")


def stop_run(request: gr.Request) -> None:
    """Stop this visitor's generation where it is; what was written stays, the panel shows its numbers."""
    run = RUNS.get(request.session_hash)
    if run is not None:
        run.stop.set()


# Cleared by data, not by hiding: toggling a Gradio 6 plot's visibility while it renders throws in the page.
EMPTY_CHART = pd.DataFrame({"token": [], "ms": [], "model": []})
PANEL_PLACEHOLDER = "Send a message to see INT8 and BF16 side by side."


def clear_run(request: gr.Request):
    """Stop this visitor's generation and empty the chat at once; replies still waiting in the queue are
    dropped. A second, queued step (`cleared`) repeats the emptying after the stopped run's last update, so a
    late streamed update cannot bring the old chat back."""
    CLEARS[request.session_hash] = CLEARS.get(request.session_hash, 0) + 1
    if len(CLEARS) > MAX_SESSIONS_REMEMBERED:  # bounded (demo.unload would do it, but breaks Gradio 6's Examples)
        CLEARS.pop(next(iter(CLEARS)))
    run = RUNS.get(request.session_hash)
    if run is not None:
        run.abandoned = True
        run.stop.set()
    return (*cleared(), "", CLEARS[request.session_hash])


def cleared():
    """(chatbot, notice, bf16 answer, chart, table) of an empty chat."""
    return [], "", "", EMPTY_CHART, PANEL_PLACEHOLDER


def retry(history: list[dict]):
    """Drop the last answer and hand its question back to be sent again."""
    history = list(history or [])
    while history and history[-1]["role"] == "assistant":
        history.pop()
    last = text_of(history.pop()["content"]) if history else ""
    return history, last


# ---------------------------------------------------------------- benchmark tab

BENCH_PROMPTS = ["Explain why the sky is blue in two sentences.", "Write a haiku about a CPU.",
                 "List three uses of a paperclip."]


def run_benchmark(new_tokens: float, rounds: float, progress=gr.Progress()):
    if not ENGINE.compare_available:
        raise gr.Error("The benchmark needs both models; the INT8 model is not loaded.")
    tok = ENGINE.tokenizer
    prompts = [torch.tensor([encode_chat(tok, [{"role": "user", "content": p}])]) for p in BENCH_PROMPTS]
    total = int(rounds) * len(prompts) * 2

    class Bar:
        done = 0

        def update(self, n: int) -> None:
            Bar.done += n
            progress(Bar.done / total, desc="INT8 and BF16, interleaved")

    with ENGINE.lock:
        res = latency.interleaved({"INT8": ENGINE.int8.model, "BF16": ENGINE.bf16.model}, prompts,
                                  int(new_tokens), int(rounds), progress=Bar())
    m = res["models"]
    rows = [{"round": i + 1, "ms": v, "model": name} for name in m for i, v in enumerate(m[name]["round_median_ms"])]
    summary = {n: {"median_ms": m[n]["median_ms"], "p10_ms": m[n]["p10_ms"], "p90_ms": m[n]["p90_ms"],
                   "tokens_per_s": m[n]["tokens_per_s"], "ttft_ms": m[n]["ttft_median_ms"],
                   "tokens": int(new_tokens)} for n in m}
    spread = (f"Speed-up per round: {', '.join(f'{r:.2f}x' for r in res['speedup_per_round'])} "
              f"(median {res['speedup_median']:.2f}x, {len(prompts)} prompts × {int(new_tokens)} tokens "
              f"× {int(rounds)} rounds, greedy)")
    return gr.LinePlot(pd.DataFrame(rows), visible=True), table_md(summary["INT8"], summary["BF16"], spread=True) + "\n\n" + spread


def quality_md(engine: Engine = ENGINE) -> str:
    r = engine.report
    if not r:
        return "No quality report found next to the INT8 model."
    q = r["quality"]
    lines = ["| model | perplexity | x BF16 | top-1 agreement | chat top-1 agreement |", "|---|---:|---:|---:|---:|"]
    for name, v in q.items():
        lines.append(f"| {name} | {v['perplexity']:.2f} | {v['perplexity_ratio']:.3f} | "
                     f"{v['top1_agreement']:.3f} | {v.get('chat_top1_agreement', float('nan')):.3f} |")
    bar = r["quality_bar"]
    verdict = "meets" if bar["met"] else "does not meet"
    return (f"From the model card (measured by `python -m quantize` on {r['cpu']['model']}, {r['created']}): "
            f"the INT8 model {verdict} the quality bar (perplexity ≤ {bar['max_perplexity_ratio']}x, "
            f"top-1 ≥ {bar['min_top1_agreement']}).\n\n" + "\n".join(lines))


# ---------------------------------------------------------------- UI

def examples() -> list[str]:
    return json.loads((ASSETS / "examples.json").read_text())


def example_text(picked: gr.SelectData) -> str:
    return picked.value["text"]


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="Q8-Chat — INT8 vs BF16 on a CPU", fill_width=False) as demo:
        gr.Markdown("# Q8-Chat\nChat with an **INT8** model; see what 8-bit quantization buys on this CPU.",
                    elem_id="title")
        header = gr.Markdown(elem_id="header")
        status_md = gr.Markdown("Starting…", elem_id="status")
        with gr.Tab("Chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=320):
                    chatbot = gr.Chatbot(elem_id="chatbot", height=460, buttons=["copy"], feedback_options=None,
                                         show_label=False,
                                         placeholder="Ask anything. The INT8 model answers; the panel shows "
                                                     "how fast, next to BF16.",
                                         examples=[{"text": e} for e in examples()])
                    notice = gr.Markdown(elem_id="notice")
                    with gr.Row():
                        box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                         scale=5, elem_id="message", max_lines=8, autofocus=True)
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send", min_width=80)
                    with gr.Row():
                        stop = gr.Button("Stop", elem_id="stop", size="sm")
                        again = gr.Button("Retry", elem_id="retry", size="sm")
                        clear = gr.Button("Clear", elem_id="clear", size="sm")
                    with gr.Accordion("System prompt and generation settings", open=False):
                        system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2)
                        max_new = gr.Slider(*SETTINGS["max_new_tokens"], value=128, step=8, label="Max new tokens")
                        temperature = gr.Slider(*SETTINGS["temperature"], value=0.0, step=0.05,
                                                label="Temperature (0 = greedy)")
                        top_p = gr.Slider(*SETTINGS["top_p"], value=0.95, step=0.05, label="Top-p")
                        compare = gr.Checkbox(True, label="After each reply, run BF16 on the same prompt")
                with gr.Column(scale=2, min_width=300, elem_id="panel"):
                    gr.Markdown("### Per-token latency, this reply")
                    chart = gr.LinePlot(None, x="token", y="ms", color="model", elem_id="chart", height=260,
                                        x_title="token", y_title="ms per token", visible=False)
                    table = gr.Markdown(PANEL_PLACEHOLDER, elem_id="table")
                    with gr.Accordion("BF16's answer to the same prompt", open=False):
                        bf16_text = gr.Markdown(elem_id="bf16-answer")
        with gr.Tab("Benchmark"):
            gr.Markdown("Fixed prompts, greedy, INT8 and BF16 **interleaved** in one run; the ratio is per round.")
            with gr.Row():
                b_tokens = gr.Slider(8, 64, value=32, step=8, label="New tokens per prompt")
                b_rounds = gr.Slider(1, 5, value=2, step=1, label="Rounds")
                b_run = gr.Button("Run benchmark", variant="primary", elem_id="run-bench")
            b_chart = gr.LinePlot(None, x="round", y="ms", color="model", height=240, visible=False,
                                  y_title="median ms per token", elem_id="bench-chart")
            b_table = gr.Markdown(elem_id="bench-table")
            quality = gr.Markdown(elem_id="quality")

        clears = gr.State(0)
        outs = [chatbot, box, chart, table, bf16_text, notice]
        ins = [box, chatbot, system, max_new, temperature, top_p, compare, clears]
        # One CPU-bound job at a time across chat and benchmark: the two models share the cores.
        kw = dict(concurrency_id="cpu", concurrency_limit=1)
        box.submit(respond, ins, outs, api_name="chat", **kw)
        send.click(respond, ins, outs, api_visibility="private", **kw)
        again.click(retry, chatbot, [chatbot, box], queue=False, api_visibility="private").then(
            respond, ins, outs, api_visibility="private", **kw)
        # The chat's own examples (shown while it is empty): a click sends the example. (gr.Examples' Dataset
        # throws in the page when its input box is updated in quick succession, as Retry and Clear do.)
        chatbot.example_select(example_text, None, box, queue=False, api_visibility="private").then(
            respond, ins, outs, api_visibility="private", **kw)
        # Stop and Clear end the run cooperatively (never a cancelled job): the worker stops at the next token,
        # the text so far stays, and the CPU is free at once.
        stop.click(stop_run, None, None, queue=False, api_name="stop")
        clear.click(clear_run, None, [chatbot, notice, bf16_text, chart, table, box, clears], queue=False,
                    api_visibility="private").then(
            cleared, None, [chatbot, notice, bf16_text, chart, table], api_visibility="private", **kw)
        b_run.click(run_benchmark, [b_tokens, b_rounds], [b_chart, b_table], api_name="benchmark", **kw)

        def status() -> dict:
            """Whether the models are loaded, and what runs; for clients and health checks."""
            return {"ready": ENGINE.ready, "status": ENGINE.status, "int8_error": ENGINE.int8.error,
                    "bf16_error": ENGINE.bf16.error, "compare": ENGINE.compare_available,
                    "busy": ENGINE.lock.locked(), "rss_bytes": settled_rss()}

        gr.api(status, api_name="status")

        timer = gr.Timer(1.0)

        def poll():
            if ENGINE.ready or ENGINE.status.startswith("No model"):
                return ENGINE.header, ENGINE.status, quality_md(), gr.Timer(active=False)
            return gr.skip(), f"**{ENGINE.status}**", gr.skip(), gr.Timer(active=True)

        timer.tick(poll, None, [header, status_md, quality, timer], queue=False, api_visibility="private")
        demo.load(poll, None, [header, status_md, quality, timer], queue=False, api_visibility="private")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    limit_malloc_arenas()
    threading.Thread(target=load_models, daemon=True, name="load-models").start()
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
