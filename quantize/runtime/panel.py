"""What the app's page says about the models and the numbers: the header, the status, the comparison table, the
per-token chart's data, the live counters, the race lanes, the quality report and the Benchmark tab's result.
Plain text and tables from the state and the measured replies; app.py puts them into components."""

from __future__ import annotations

import functools
import html

import pandas as pd

from quantize import machine
from quantize.runtime.chat import Reply
from quantize.runtime.latency import fmt, speedup_line
from quantize.runtime.remote import Endpoint
from quantize.runtime.serving import Serving

PLACEHOLDER = "Send a message to see INT8 and BF16 side by side."
MODELS = ("INT8", "BF16")
STOPPED = {  # on top of the table, by whether BF16 had started
    False: "Stopped: BF16 was not run for this reply.\n\n",
    True: "Stopped during the BF16 run: its numbers cover the tokens it produced.\n\n",
}
KEPT = (
    "*kept*: the prompt's first tokens were already in memory from your last turn, so the model read only the "
    "tokens after them: its time to first token is shorter for it (prefix reuse)."
)


@functools.cache
def cpu_line() -> str:
    return machine.describe_cpu().line()


def header_md(state: Serving) -> str:
    rec = (state.report or {}).get("recipe") or {}
    recipe = (
        f"SmoothQuant alpha {rec.get('alpha')} · recipe `{rec.get('name')}`"
        if rec.get("smooth_quant")
        else "the served model's own (its card says)"
        if isinstance(state.int8.decoder, Endpoint)
        else "recipe unknown (no quantize_report.json)"
    )
    loaded = [m.decoder for m in (state.int8, state.bf16) if m.decoder is not None]
    served = " / ".join(dict.fromkeys(d.label for d in loaded))
    parts = [
        f"**Chat model:** {state.chat_model().label}",
        f"**Compared with:** {state.bf16.label}",
        f"**Recipe:** {recipe}",
        f"**Runs on:** {served}",
        f"**CPU:** {cpu_line()}",
    ]
    head = " &nbsp;·&nbsp; ".join(parts)
    if state.bf16.error and state.int8.decoder is not None:
        head += f"\n\n**BF16 not loaded** — {state.bf16.error}"
    elif state.int8.error:
        head += f"\n\n**INT8 unavailable** — serving BF16 alone, comparison off. Reason: {state.int8.error}"
    elif state.int8.decoder is None and state.ready:
        head += "\n\n**INT8 is not ready yet** — BF16 answers until it is."
    return head


def status_html(state: Serving) -> str:
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


def chart_frame(replies: dict[str, Reply | None]) -> tuple[pd.DataFrame, str | None]:
    """Per-token decode time of each model (token k's point is the gap since token k-1) and the chart's title,
    the first token's time (TTFT). A model without one has a single empty point, so both models are always
    in the legend: Gradio's plot keeps the colors of its first data."""
    rows, ttft = [], []
    for name in MODELS:
        r = replies.get(name)
        if r is not None and len(r.timing.stamps) > 1:
            rows += [{"token": i + 2, "ms": ms, "model": name} for i, ms in enumerate(r.timing.decode_ms)]
            ttft.append(f"{name} {r.timing.ttft_ms:.0f} ms")
        else:
            rows.append({"token": 1, "ms": float("nan"), "model": name})
    return pd.DataFrame(rows), ("TTFT " + " · ".join(ttft)) if ttft else None


def _mb(n: int) -> float | None:
    return n / 1e6 or None


def table_md(a: dict | None, b: dict | None, state: Serving, rounds: list[float] | None = None) -> str:
    """INT8 (`a`) next to BF16 (`b`), two `latency.summarize` results, with the verdict on top. With the
    per-round speed-ups of a benchmark, the verdict gives them and the table the p10 too."""
    a, b = a or {}, b or {}
    rows = [
        ("Time to first token (ms)", "ttft_ms", ".0f"),
        ("Median ms / token", "median_ms", ".1f"),
        ("p90 ms / token", "p90_ms", ".1f"),
        ("Tokens / s", "tokens_per_s", ".1f"),
        ("Tokens generated", "tokens", "d"),
    ]
    if "others_median" in a or "others_median" in b:  # a reply's (not a benchmark's): its token times are its
        rows.append(("Other replies in its steps (median)", "others_median", ".0f"))  # batch's steps
        rows.append(("Its model's own pass (median ms)", "own_pass_ms", ".1f"))  # without the other models'
    if rounds:
        rows.insert(2, ("p10 ms / token", "p10_ms", ".1f"))
    cells = [(name, fmt(a.get(key), spec), fmt(b.get(key), spec)) for name, key, spec in rows]
    kept = (a.get("kept_tokens") or 0, b.get("kept_tokens") or 0)
    if any(kept):  # the TTFT row: how much of the prompt was not read
        name, *ttft = cells[0]
        cells[0] = (name, *(f"{t} ({k} kept)" if k else t for t, k in zip(ttft, kept)))
    cells += [
        ("Weights (MB)", fmt(_mb(state.int8.weight_bytes), ".0f"), fmt(_mb(state.bf16.weight_bytes), ".0f")),
        (
            "Read per token (MB)",
            fmt(_mb(state.int8.bytes_per_token), ".0f"),
            fmt(_mb(state.bf16.bytes_per_token), ".0f"),
        ),
        (
            "Resident memory (MB)",
            fmt(_mb(state.int8.rss_bytes), ".0f"),
            fmt(_mb(state.bf16.rss_bytes), ".0f"),
        ),
    ]
    if state.int8.compile_bytes or state.bf16.compile_bytes:  # the compiler's state, apart from the models'
        compiled = (fmt(_mb(side.compile_bytes), ".0f") for side in (state.int8, state.bf16))
        cells.append(("Its compiled decode step (MB)", *compiled))
    lines = ["| | INT8 | BF16 |", "|---|---:|---:|"] + [f"| {r} | {x} | {y} |" for r, x, y in cells]
    lines += ["", KEPT] if any(kept) else []
    lines += ["", served_line(state)] if served_line(state) else []
    return verdict(a, b, state, rounds) + "\n\n" + "\n".join(lines)


def served_line(state: Serving) -> str:
    """For models served elsewhere (runtime/remote.py): who served each, and that its times include the network."""
    served = [f"{name} {m.decoder.label}" for name, m in zip(MODELS, (state.int8, state.bf16))
              if isinstance(m.decoder, Endpoint)]  # fmt: skip
    if not served:
        return ""
    return f"*Timed here as each token arrived*: {'; '.join(served)}. No weights are loaded in this app."


def verdict(a: dict, b: dict, state: Serving, rounds: list[float] | None = None) -> str:
    if state.int8.decoder is None and state.int8.error is None and state.ready:
        return "INT8 is not ready yet: BF16 answers while it is built. The comparison starts once it is."
    if not state.compare_available:
        return state.bf16.error or "Comparison unavailable: only one model is loaded."
    if a.get("median_ms") and b.get("median_ms"):
        int8_read, bf16_read = state.int8.bytes_per_token, state.bf16.bytes_per_token
        predicted = bf16_read / int8_read if int8_read and bf16_read else None
        line = speedup_line(rounds or [b["median_ms"] / a["median_ms"]], predicted=predicted)
        loads = (a.get("others_median") or 0, b.get("others_median") or 0)
        if any(loads):  # each side's token times are its batches' steps: say what load each met
            line += (f" — under load: INT8's steps were shared with {loads[0]:.0f} other replies (median), "
                     f"BF16's with {loads[1]:.0f}")  # fmt: skip
        return line
    return "Speed-up appears once both models have answered."


def live_line(label: str, reply: Reply, window: int, done: bool = False) -> str:
    """The counters under the chat while a reply streams: tokens, tokens/s, context used of the model's window."""
    s = reply.timing.summary()
    used = reply.prompt_tokens + len(reply.token_ids)
    of_window = f" of {window:,}" if window else ""
    return (
        f"**{label}** {'answered' if done else 'writing'} · {s['tokens']} tokens · "
        f"{fmt(s['tokens_per_s'])} tokens/s · context {used:,}{of_window}"
    )


def race_md(name: str, reply: Reply, seconds: float, tokenizer) -> str:
    """One lane of the race: the answer as it stood `seconds` into the measured run."""
    clock = f"finished at {reply.seconds:.2f} s" if seconds >= reply.seconds else f"{seconds:.2f} s"
    return f"**{name}** · {clock}\n\n{reply.text_at(tokenizer, seconds)}"


def quality_md(report: dict | None) -> str:
    """The quality section of the INT8 model's own report (quantize_report.json), as measured when it was made."""
    if not report:
        return "No quality report found next to the INT8 model."
    lines = [
        "| model | perplexity | x BF16 | top-1 agreement | long prompt x BF16 | long prompt top-1 | chat top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in report["quality"].items():
        lines.append(
            f"| {name} | {fmt(v['perplexity'], '.2f')} | {fmt(v['perplexity_ratio'], '.3f')} | "
            f"{fmt(v['top1_agreement'], '.3f')} | {fmt(v.get('long_perplexity_ratio'), '.3f')} | "
            f"{fmt(v.get('long_top1_agreement'), '.3f')} | {fmt(v.get('chat_top1_agreement'), '.3f')} |"
        )
    bar = report["quality_bar"]
    return (
        f"From the model card (measured by `python -m quantize` on {report['cpu']['model']}, "
        f"{report['created']}): the INT8 model {'meets' if bar['met'] else 'does not meet'} the quality bar "
        f"(perplexity ≤ {bar['max_perplexity_ratio']}x, top-1 ≥ {bar['min_top1_agreement']}).\n\n"
        + "\n".join(lines)
    )


def benchmark_md(result: dict, state: Serving) -> tuple[pd.DataFrame, str]:
    """The Benchmark tab: each round's median ms/token per model, and the table with the per-round speed-up."""
    m = result["models"]
    rows = [{"round": i + 1, "ms": v, "model": n} for n in m for i, v in enumerate(m[n]["round_median_ms"])]
    runs = f"{result['prompts']} prompts × {result['new_tokens']} tokens × {result['rounds']} rounds, greedy"
    table = table_md(m["INT8"], m["BF16"], state, rounds=result["speedup_per_round"])
    return pd.DataFrame(rows), f"{table}\n\nMedian of each round's ms/token; {runs}."
