"""Q8-Chat — chat with an INT8 (SmoothQuant) LLM on a plain CPU, and see per token what INT8 buys over BF16.

Run: `python app.py` (offline: the embedded default model; the INT8 copy is built on first start and cached, and
BF16 answers meanwhile). Models are configured in the environment: see quantize/runtime/serving.py. Gradio's own
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT apply.

This file is the page and its handlers; they use quantize/runtime/serving.py (the models), chat.py (a message, its prompt,
the live decode), sessions.py (Stop, Clear), panel.py (the panel's text and data) and latency.py (the numbers).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import torch
from tqdm import tqdm

from quantize import machine
from quantize.maintainer import cli
from quantize.runtime import admission, chat, latency, panel, remote, serving
from quantize.runtime.generate import Sampling
from quantize.runtime.scheduler import NoRoom
from quantize.runtime.sessions import Generation, Sessions

log = logging.getLogger("q8chat")
ASSETS = Path(__file__).parent / "assets"
QUEUE_SIZE = 16
DEFAULT_SYSTEM = chat.DEFAULT_SYSTEM
CHART_COLORS = {"INT8": "#4f46e5", "BF16": "#d97706"}
STATE = serving.Serving(serving.configured_pairs(), build=cli.main)
SESSIONS = Sessions()
UI = SimpleNamespace()  # the page's components, filled by build_ui; handlers name their outputs through it


def asset(name: str):
    return json.loads((ASSETS / name).read_text())


# ---------------------------------------------------------------- a message and its reply


def reply(prepare, history, settings: tuple, compare: bool, clear_count: int, request, typed=gr.skip()):
    """The one path of Send, Retry, an example and Continue: checks, then `answer`. `prepare(history, budget)`
    makes the Turn from the checked history, within the tokens the model may read; a refusal keeps the history and the `typed` text as they were."""
    visitor = getattr(request, "session_hash", None)  # API calls have one too
    session = visitor or f"anon-{time.monotonic_ns()}"
    keeping = chat.Keeping(visitor, epoch=chat.PREFIXES.epoch(visitor)) if visitor else chat.Keeping()
    # asked for before the visitor pressed Clear: by the page's count, or it waited in the queue meanwhile
    if SESSIONS.cleared_since(session, clear_count, admission.joined_at(request)):
        yield {UI.notice: gr.skip()}  # nothing changes (an empty dict would be read as one output's value)
        return
    try:
        if not STATE.ready:
            raise chat.Refused(STATE.status or "The models are still loading; try again in a moment.")
        sampling, notes = chat.read_settings(*settings)
        turn = prepare(chat.check_history(history), chat.input_budget(STATE.window, sampling.max_new_tokens))
    except chat.Refused as e:
        gr.Warning(str(e))
        kept = history if isinstance(history, list) else []
        yield {UI.chatbot: kept, UI.message: typed, UI.notice: f"Not sent: {e}"}
        return
    notice = " ".join(f"Note: {n}" for n in [*notes, turn.note] if n)
    # registered first, so Stop and Clear reach a reply that waits for a switch or the benchmark to end
    with SESSIONS.generation(session) as gen, STATE.cpu.shared() as moved:  # the scheduler batches replies
        # closing: when Gradio closes us (the visitor left), the answer's stream is closed at once, and stops
        with contextlib.closing(answer(turn, sampling, compare, notice, gen, keeping)) as outs:
            for out in outs:
                yield out
                moved()  # resumed: the reply is alive (serving.CpuUse drops the shares of replies that stand still)


def respond(message, history, system, max_new, temperature, top_p, compare, clear_count, request: gr.Request):
    """A new message: answered by the chat model (INT8) and, for the comparison, by BF16."""
    prepare = functools.partial(chat.new_turn, STATE.tokenizer, message, system)
    yield from reply(prepare, history, (max_new, temperature, top_p), compare, clear_count, request, message)


def continue_reply(
    history, last_prompt, max_new, temperature, top_p, compare, clear_count, request: gr.Request
):
    """Continue: the model picks up the last answer where it stopped, and the answer grows in place."""
    prepare = functools.partial(chat.continuation, STATE.tokenizer, last_prompt)
    yield from reply(prepare, history, (max_new, temperature, top_p), compare, clear_count, request)


def answer(
    turn: chat.Turn, sampling: Sampling, compare: bool, notice: str, gen: Generation, keeping: chat.Keeping
):
    """Streams the chat model's answer into the last message (after what it already says), then BF16's answer
    to the same ids for the comparison, then the panel and the race of the two. Each model keeps the visitor's
    conversation for their next turn (`keeping`)."""
    history, ids, prefix = turn.history, turn.ids, chat.text_of(turn.history[-1]["content"])
    model = STATE.chat_model()  # read once the models are ours: a switch may have happened meanwhile
    if model.decoder is None or not STATE.ready:  # it did, and the next pair is still loading
        gr.Warning("The models were switched while your message waited; send it again in a moment.")
        yield {UI.notice: "Not sent: the models were switched while it waited."}
        return
    yield {UI.message: "", UI.notice: notice, UI.last_prompt: turn.prompt}
    comparing = compare and STATE.compare_available and model is STATE.int8
    try:
        first = yield from stream_one(
            model, turn, sampling, gen, fair(keeping, comparing, ids), history, prefix
        )
    # the server is down or slow, or this machine has no room for the reply's cache: the app is not down
    except (remote.EndpointError, NoRoom) as e:
        yield dict(zip(UI.emptied, empty_chat())) if gen.abandoned else server_failed(e, turn, prefix)
        return
    int8 = first if model is STATE.int8 else None
    bf16, compared = (None if int8 else first), False
    if not gen.stop.is_set() and comparing:
        bf16, why = yield from compare_bf16(int8, turn, sampling, gen, keeping)
        compared, notice = bf16 is not None, f"{notice} {why}".strip()
    if gen.abandoned:  # Clear: our last word agrees with Clear's, whichever reaches the page last
        yield dict(zip(UI.emptied, empty_chat()))
        return
    # the last reply running gives the temporaries back to the OS (not per /status; under load a full
    # collection would stall the others' steps)
    if STATE.cpu.replies == 1:
        machine.release_memory()
    out = panel_outputs(int8, bf16) | {
        UI.chatbot: history,
        UI.message: "",
        UI.notice: notice,
        UI.bf16_text: bf16.text if compared else "",
        UI.live: panel.live_line(model.label, first, STATE.window, done=True),
    }
    if gen.stop.is_set():
        out[UI.table] = panel.STOPPED[compared] + out[UI.table]
    if int8 and compared:
        race = {"INT8": int8, "BF16": bf16}
        out |= {UI.race: race} | race_outputs(race, float("inf"))
    yield out


def compare_bf16(
    int8: chat.Reply, turn: chat.Turn, sampling: Sampling, gen: Generation, keeping: chat.Keeping
):
    """BF16's answer to the same prompt, streamed into its box; (None, why) when its server failed (INT8's answer
    stands, and the visitor reads why nothing was compared)."""
    table = panel.table_md(int8.timing.summary(), None, STATE)
    yield panel_outputs(int8, None) | {UI.table: "Running the same prompt on BF16…\n\n" + table}
    try:
        return (yield from stream_one(STATE.bf16, turn, sampling, gen, keeping)), ""
    except (remote.EndpointError, NoRoom) as e:
        gr.Warning(str(e))
        return None, f"Not compared: {e}"


def server_failed(error: Exception, turn: chat.Turn, prefix: str) -> dict:
    """The chat when the server (or the memory for its cache) failed to answer: what it had written stays (Continue picks it up); when it wrote
    nothing, the chat is as it was and the message is back in the box."""
    gr.Warning(str(error))
    history = turn.history
    if chat.text_of(history[-1]["content"]) != prefix:
        return {UI.chatbot: history, UI.notice: f"The answer stopped: {error}"}
    if turn.messages is None:  # Continue: its message was already in the chat
        return {UI.chatbot: history, UI.notice: f"Not continued: {error}"}
    typed = turn.messages[-1]["content"]
    # no prompt for Continue either: the answer it would continue is gone
    return {
        UI.chatbot: history[:-2],
        UI.message: typed,
        UI.notice: f"Not answered: {error}",
        UI.last_prompt: None,
    }


def live(
    model: serving.LoadedModel,
    turn: chat.Turn,
    sampling: Sampling,
    stop: threading.Event,
    keeping: chat.Keeping,
) -> Iterator[chat.Reply]:
    """The reply as it streams: from the engine here, or from the server that serves the model (runtime/remote.py,
    which stamps each token as it arrives)."""
    if isinstance(model.decoder, remote.Endpoint):
        eos = STATE.tokenizer.eos_token_id
        return remote.decode_remote(
            model.decoder, turn.messages, turn.ids, sampling, stop, eos, chat.UI_INTERVAL_S
        )
    return chat.decode_live(model.decoder, STATE.tokenizer, turn.ids, sampling, stop, keeping)


def fair(keeping: chat.Keeping, comparing: bool, ids: list[int]) -> chat.Keeping:
    """What INT8 may take of its kept conversation: when BF16 will be compared, no more than BF16 can take (INT8
    kept its own answer, which the chat shows; BF16 kept one that may differ), so both read the same prompt
    tokens and their times to first token compare."""
    if not (comparing and keeping.visitor):
        return keeping
    return replace(keeping, at_most=chat.PREFIXES.shared(keeping.visitor, STATE.bf16.decoder, ids))


def stream_one(
    model: serving.LoadedModel,
    turn: chat.Turn,
    sampling: Sampling,
    gen: Generation,
    keeping: chat.Keeping,
    history=None,
    prefix="",
):
    """Streams one model's reply: into the chat's last message (`history`), or into the BF16 answer box.
    Returns the Reply; the live counters follow it."""
    so_far, why = None, ""
    try:
        for so_far in live(model, turn, sampling, gen.stop, keeping):
            if gen.abandoned:
                break
            out = {UI.live: panel.live_line(model.label, so_far, STATE.window)}
            if history is not None:
                history[-1] = {"role": "assistant", "content": chat.as_markdown(prefix + so_far.text)}
                out[UI.chatbot] = history
            else:
                out[UI.bf16_text] = so_far.text
            yield out
        why = " (stopped)" if gen.stop.is_set() else ""
    except GeneratorExit:  # Gradio closes us when the visitor leaves; decode_live has stopped the model
        why = " (stopped: visitor left)"
        raise
    finally:
        log.info("reply: %d tokens on %s%s", len(so_far.token_ids) if so_far else 0, model.label, why)
    if so_far is not None and not gen.abandoned:
        yield {UI.live: panel.live_line(model.label, so_far, STATE.window, done=True)}
    return so_far


def panel_outputs(int8: chat.Reply | None, bf16: chat.Reply | None) -> dict:
    frame, title = panel.chart_frame({"INT8": int8, "BF16": bf16})
    chart = gr.LinePlot(frame, x_lim=[1, max(int(frame["token"].max()), 12)], title=title)
    summaries = [r.timing.summary() if r is not None else None for r in (int8, bf16)]
    return {UI.chart: chart, UI.table: panel.table_md(*summaries, STATE)}


def race_outputs(race: dict[str, chat.Reply], seconds: float) -> dict:
    return {
        UI.race_int8: panel.race_md("INT8", race["INT8"], seconds, STATE.tokenizer),
        UI.race_bf16: panel.race_md("BF16", race["BF16"], seconds, STATE.tokenizer),
    }


def replay_race(race: dict | None):
    """Replays both answers at their measured time stamps (a replay of what was timed, not a new run). Frames
    go out every chat.UI_INTERVAL_S and at each model's finishing time, so a lane ends when its model did."""
    if not race:
        gr.Warning("The race needs both answers: send a message with the BF16 comparison on.")
        return
    for seconds in chat.replay_clock([r.seconds for r in race.values()]):
        yield race_outputs(race, seconds)


# ---------------------------------------------------------------- Stop, Clear, Retry


def stop(request: gr.Request) -> None:
    """Stop this visitor's reply where it is; what was written stays, the panel shows its numbers."""
    SESSIONS.stop(request.session_hash)


def clear_chat(request: gr.Request):
    """Stop this visitor's reply and empty the chat at once; replies still waiting in the queue are dropped. A
    second, queued step (`empty_chat`) repeats the emptying after the stopped reply's last update, so a late
    streamed update cannot bring the old chat back."""
    chat.PREFIXES.forget(request.session_hash)  # the conversation is gone: what the models kept of it too
    return (*empty_chat(), "", SESSIONS.clear(request.session_hash))


def empty_chat() -> tuple:
    """The values of UI.emptied for an empty chat. (The chart is emptied by data: toggling a Gradio 6 plot's
    visibility while it renders throws in the page.)"""
    return [], "", "", panel_outputs(None, None)[UI.chart], panel.PLACEHOLDER, "", None, "", ""


def retry(history: list[dict], clear_count: int, request: gr.Request):
    """Drop the last answer and hand its question back to be sent again, with the clear count of the click: a
    Clear pressed since then (its answer may reach the server first) leaves the chat empty and the resend off."""
    if SESSIONS.cleared_since(request.session_hash, clear_count):
        return gr.skip(), gr.skip(), clear_count
    history = list(history or [])
    while history and history[-1]["role"] == "assistant":
        history.pop()
    last = chat.text_of(history.pop()["content"]) if history else ""
    return history, last, clear_count


def example_text(clear_count: int, picked: gr.SelectData) -> tuple[str, int]:
    return picked.value["text"], clear_count


# ---------------------------------------------------------------- models, status, benchmark


def poll(shown: str | None):
    """Every second: the header, the status and, when the chat has just moved to INT8, a notice under the chat
    (a toast would need a queued event, and a queued tick per page and second would crowd out the replies)."""
    label = STATE.chat_model().label if STATE.ready else None
    moved = bool(shown) and not shown.startswith("INT8") and (label or "").startswith("INT8")
    header = panel.header_md(STATE) if STATE.ready or STATE.status.startswith("No model") else ""
    notice = (
        "INT8 is ready: replies now come from the INT8 model, compared with BF16." if moved else gr.skip()
    )
    return header, panel.status_html(STATE), panel.quality_md(STATE.report), label, notice


def switch_pair(name: str, token: str | None = None, request: gr.Request = None):
    """Unload the current pair (after the reply in progress) and load the chosen one in the background."""
    refusal = admission.owner_refusal(token, request)
    if refusal:
        gr.Warning(refusal)
        return gr.Dropdown(value=STATE.pair.name if STATE.pair else None)
    if serving.loading() or STATE.pair is None:
        gr.Warning("A model is still loading; choose again when it is ready.")
        return gr.Dropdown(value=STATE.pair.name if STATE.pair else None)
    if name != STATE.pair.name:
        serving.switch(STATE, name)
    return gr.skip()


def status() -> dict:
    return serving.status(STATE)


def run_benchmark(
    new_tokens: float,
    rounds: float,
    token: str | None = None,
    request: gr.Request = None,
    progress=gr.Progress(track_tqdm=True),
):
    """Fixed prompts, greedy, both models interleaved in one run (latency.interleaved): the CPU is the benchmark's
    for its whole run, so it is the Space owner's to start (admission.owner_refusal)."""
    refusal = admission.owner_refusal(token, request)
    if refusal:
        raise gr.Error(refusal)
    if not STATE.compare_available:
        raise gr.Error(
            "The benchmark needs both models loaded; " + (STATE.bf16.error or "the INT8 model is not.")
        )
    chats = [[{"role": "user", "content": text}] for text in asset("bench_prompts.json")]
    prompts = [torch.tensor([chat.encode_chat(STATE.tokenizer, c)]) for c in chats]
    decoders = {"INT8": STATE.int8.decoder, "BF16": STATE.bf16.decoder}
    with (
        STATE.cpu.alone(),
        tqdm(total=int(rounds) * len(prompts) * 2, desc="INT8 and BF16, interleaved") as bar,
    ):
        run = chat.on_model_thread(latency.interleaved, decoders, prompts, int(new_tokens), int(rounds), bar)
        result = run.result()
    return panel.benchmark_md(result, STATE)


# ---------------------------------------------------------------- the page


def ms_plot(x: str, y_title: str, elem_id: str, height: int, **more) -> gr.LinePlot:
    """A chart of ms (per token) by `x`, one line per model, in the models' colors."""
    return gr.LinePlot(None, x=x, y="ms", color="model", color_map=CHART_COLORS, y_title=y_title,
                       elem_id=elem_id, height=height, **more)  # fmt: skip


def chat_column() -> None:
    UI.chatbot = gr.Chatbot(
        elem_id="chatbot",
        height=460,
        buttons=["copy"],
        feedback_options=None,
        show_label=False,
        examples=[{"text": e} for e in asset("examples.json")],
        placeholder="Ask anything. The INT8 model answers; the panel shows how fast, next to BF16.",
    )
    UI.live = gr.Markdown(elem_id="live")
    UI.notice = gr.Markdown(elem_id="notice")
    with gr.Row():
        UI.message = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            scale=5,
            elem_id="message",
            max_lines=8,
            autofocus=True,
        )
        UI.send = gr.Button("Send", variant="primary", scale=1, elem_id="send", min_width=80)
    with gr.Row():
        buttons = {"stop": "Stop", "resume": "Continue", "retry": "Retry", "clear": "Clear"}
        for name, label in buttons.items():  # elem_ids: #stop, #continue, #retry, #clear
            setattr(UI, name, gr.Button(label, elem_id=label.lower(), size="sm"))
    with gr.Accordion("System prompt and generation settings", open=False):
        UI.system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2)
        UI.max_new = gr.Slider(*chat.SETTINGS["max_new_tokens"], value=128, step=8, label="Max new tokens")
        UI.temperature = gr.Slider(
            *chat.SETTINGS["temperature"], value=0.0, step=0.05, label="Temperature (0 = greedy)"
        )
        UI.top_p = gr.Slider(*chat.SETTINGS["top_p"], value=0.95, step=0.05, label="Top-p")
        UI.compare = gr.Checkbox(True, label="After each reply, run BF16 on the same prompt")


def panel_column() -> None:
    names = [p.name for p in STATE.pairs]
    UI.model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model", interactive=len(names) > 1)
    gr.Markdown("### Per-token latency, this reply")
    UI.chart = ms_plot("token", "ms per token", "chart", 260, x_title="token", x_axis_format="d")
    UI.table = gr.Markdown(panel.PLACEHOLDER, elem_id="table")
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
        UI.bench_tokens = gr.Slider(8, 64, value=32, step=8, label="New tokens per prompt")
        UI.bench_rounds = gr.Slider(1, 5, value=2, step=1, label="Rounds")
        UI.bench_run = gr.Button("Run benchmark", variant="primary", elem_id="run-bench")
    UI.bench_chart = ms_plot("round", "median ms per token", "bench-chart", 240)
    UI.bench_table = gr.Markdown(elem_id="bench-table")
    UI.quality = gr.Markdown(elem_id="quality")


def parts(names: str) -> list:
    return [getattr(UI, n) for n in names.split()]


def wire_events() -> None:
    UI.clear_count, UI.last_prompt, UI.race, UI.asked_at = (gr.State(v) for v in (0, None, None, 0))
    UI.emptied = parts("chatbot notice bf16_text chart table live race race_int8 race_bf16")
    outputs = parts("chatbot message chart table bf16_text notice live last_prompt race race_int8 race_bf16")
    settings = parts("max_new temperature top_p compare clear_count")
    message = [UI.message, UI.chatbot, UI.system, *settings]
    # replies run together, as many as the scheduler's slots (Gradio's queue holds the rest and tells each visitor
    # their place); the benchmark and a switch want the models alone, one at a time (serving.CpuUse)
    cpu = dict(concurrency_id="chat", concurrency_limit=chat.SLOTS)
    alone = dict(concurrency_id="alone", concurrency_limit=1)
    private = dict(api_visibility="private")
    UI.message.submit(respond, message, outputs, api_name="chat", **cpu)
    UI.send.click(respond, message, outputs, **private, **cpu)
    UI.resume.click(
        continue_reply, parts("chatbot last_prompt") + settings, outputs, api_name="continue", **cpu
    )
    # Retry and an example send in a second step, with the clear count of the click (asked_at)
    resend = [UI.message, UI.chatbot, UI.system, *parts("max_new temperature top_p compare asked_at")]
    retried = parts("chatbot message asked_at")
    UI.retry.click(retry, parts("chatbot clear_count"), retried, queue=False, **private).then(
        respond, resend, outputs, **private, **cpu
    )
    # The chat's own examples (shown while it is empty): a click sends the example. (gr.Examples' Dataset
    # throws in the page when its input box is updated in quick succession, as Retry and Clear do.)
    UI.chatbot.example_select(example_text, UI.clear_count, retried[1:], queue=False, **private).then(
        respond, resend, outputs, **private, **cpu
    )
    # Stop and Clear end the reply cooperatively (never a cancelled job): the worker stops at the next token,
    # the text so far stays, and the CPU is free at once.
    UI.stop.click(stop, None, None, queue=False, api_name="stop")
    UI.clear.click(clear_chat, None, UI.emptied + parts("message clear_count"), queue=False, **private).then(
        empty_chat, None, UI.emptied, **private, **cpu
    )
    replays = dict(concurrency_id="race", concurrency_limit=8)  # a replay only sleeps: it needs no CPU slot
    UI.race_run.click(replay_race, UI.race, parts("race_int8 race_bf16"), **private, **replays)
    # the two actions that change the Space for everyone carry the owner's token (owner_refusal); the switch is
    # hidden from the API, the benchmark listed for the owner's scripts
    bench = parts("bench_tokens bench_rounds admin"), parts("bench_chart bench_table")
    UI.bench_run.click(run_benchmark, *bench, api_name="benchmark", **alone)
    UI.model.change(switch_pair, parts("model admin"), UI.model, api_name="switch_model", **private, **alone)


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="Q8-Chat — INT8 vs BF16 on a CPU", fill_width=False) as demo:
        gr.Markdown(
            "# Q8-Chat\nChat with an **INT8** model; see what 8-bit quantization buys on this CPU.",
            elem_id="title",
        )
        header = gr.Markdown(elem_id="header")
        status_line = gr.HTML("<p>Starting…</p>", elem_id="status")
        with gr.Tab("Chat"), gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                chat_column()
            with gr.Column(scale=2, min_width=300, elem_id="panel"):
                panel_column()
        with gr.Tab("Benchmark"):
            benchmark_tab()
        with gr.Accordion("Space owner", open=False, visible=bool(os.environ.get("Q8CHAT_ADMIN_TOKEN"))):
            UI.admin = gr.Textbox(
                label="Admin token (switching models, the benchmark)", type="password", elem_id="admin"
            )
        wire_events()
        gr.api(status, api_name="status")
        shown = gr.State(None)  # the chat model this page last showed, to notice the move to INT8
        ticks = [header, status_line, UI.quality, shown, UI.notice]
        gr.Timer(1.0).tick(poll, shown, ticks, queue=False, api_visibility="private")
        demo.load(poll, shown, ticks, queue=False, api_visibility="private")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    machine.limit_malloc_arenas()
    serving.start_loading(STATE, STATE.pairs[0])
    demo = build_ui()
    # api_open=False everywhere (Gradio opens it off a Space): /gradio_api/run/* would run a reply outside the
    # queue, and a made-up event id left its generator paused inside the models' shared use for good
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1, api_open=False)
    admission.admit_fairly(demo._queue)
    demo.launch(
        server_name=os.environ.get(
            "GRADIO_SERVER_NAME", "0.0.0.0" if admission.on_a_space() else "127.0.0.1"
        ),
        theme=gr.themes.Soft(primary_hue="indigo", neutral_hue="slate"),
        css_paths=[ASSETS / "style.css"],
        show_error=True,  # API clients get Gradio's validation sentence, not 'an exception was raised'
        footer_links=["api"],
    )


if __name__ == "__main__":
    main()
