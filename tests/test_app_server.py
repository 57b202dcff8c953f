"""The running app, over real HTTP: `python app.py` on the embedded default model, driven by gradio_client and
by headless Debian Chromium through Playwright."""

import contextlib
import os
import re
import time

import pytest
from conftest import ANSWER, ARTIFACTS, QUESTION

from app import DEFAULT_SYSTEM

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("Q8CHAT_CHROMIUM", "/usr/bin/chromium")
BOT = '#chatbot [data-testid="bot"]'  # an assistant message in Gradio 6's chatbot
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_idle(url: str, seconds: float = 60) -> None:
    """Until no reply is running (the app's /status), within `seconds`."""
    from gradio_client import Client

    client, deadline = Client(url, verbose=False), time.monotonic() + seconds
    while client.predict(api_name="/status")["busy"]:
        assert time.monotonic() < deadline, f"a reply was still running after {seconds} s"
        time.sleep(0.2)


@contextlib.contextmanager
def app_page(url: str, errors: list[str], header: str = "CPU"):
    """A page of the app in headless Debian Chromium, loaded until the header says `header`; console errors
    and uncaught page errors are appended to `errors`."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, wait_until="load")
        page.wait_for_selector(f"#header:has-text({header!r})", timeout=60_000)
        yield page
        browser.close()


def test_status_reports_both_models(app_url):
    from gradio_client import Client

    s = Client(app_url, verbose=False).predict(api_name="/status")
    assert s["ready"] and s["compare"] and s["int8_error"] is None


def test_chat_api_streams_int8_and_fills_the_panel(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    job = client.submit(QUESTION, [], DEFAULT_SYSTEM, 24, 0.0, 0.95, True, api_name="/chat")
    updates = list(job)  # every streamed update
    history, box, chart, table, bf16_answer, notice, live, race_int8, race_bf16 = job.result()
    assert box == ""
    answer = history[-1]["content"]
    answer = answer if isinstance(answer, str) else "".join(p.get("text", "") for p in answer)
    assert ANSWER in answer
    assert len(updates) > 3
    assert "faster" in table or "slower" in table
    medians = re.search(r"\| Median ms / token \| ([\d.]+) \| ([\d.]+) \|", table)
    assert medians and float(medians[1]) > 0 and float(medians[2]) > 0
    assert ANSWER in bf16_answer  # BF16's own answer to the same prompt
    # the counters under the chat: tokens, rate and context used out of the model's window (SmolLM2: 8192)
    tokens = re.search(r"(\d+) tokens · ([\d.]+) tokens/s · context (\d+) of 8,192", live)
    assert tokens and int(tokens[1]) > 1 and float(tokens[2]) > 0 and int(tokens[3]) > int(tokens[1]), live
    # the race's lanes hold both answers, each with its measured finishing time
    assert "finished at" in race_int8 and answer.strip()[:20] in race_int8
    assert "finished at" in race_bf16 and bf16_answer.strip()[:20] in race_bf16
    # the engine keeps only INT8 bytes: the INT8 model adds less resident memory than BF16 (INC's loader: 3.5x more)
    memory = re.search(r"\| Resident memory \(MB\) \| (\d+) \| (\d+) \|", table)
    assert memory and 0 < int(memory[1]) < int(memory[2]), table


def test_a_long_reply_reaches_the_client_in_growing_pieces(app_url):
    """Streamed: the reply's text grows over several updates (one every chat.UI_INTERVAL_S at most), each
    extending the one before, rather than arriving in one piece at the end."""
    from gradio_client import Client

    job = Client(app_url, verbose=False).submit(
        "Write a long story about a lighthouse keeper.",
        [],
        DEFAULT_SYSTEM,
        96,
        0.0,
        0.95,
        False,
        api_name="/chat",
    )
    texts = []
    for update in job:
        history = update[0]  # a dict ({"__type__": "update"}) in updates that leave the chat as it was
        if isinstance(history, list) and history and history[-1]["role"] == "assistant":
            content = history[-1]["content"]
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            if text and (not texts or text != texts[-1]):
                texts.append(text)
    assert len(texts) >= 3, texts
    assert all(b.startswith(a.rstrip()) for a, b in zip(texts, texts[1:])), texts


def test_benchmark_tab_api_interleaves_both_models(app_url):
    """The Benchmark tab over its API: per round, each model's median ms/token; the table's speed-up is the
    ratio of those medians, round by round, worked out here from the chart's own numbers."""
    from gradio_client import Client

    chart, table = Client(app_url, verbose=False).predict(8, 2, api_name="/benchmark")
    rows = [dict(zip(chart["columns"], r)) for r in chart["data"]]
    per_model = {
        m: [r["ms"] for r in sorted(rows, key=lambda r: r["round"]) if r["model"] == m]
        for m in ("INT8", "BF16")
    }
    assert [len(v) for v in per_model.values()] == [2, 2] and all(
        ms > 0 for v in per_model.values() for ms in v
    )
    ratios = [b / a for a, b in zip(per_model["INT8"], per_model["BF16"])]
    assert f"(rounds {ratios[0]:.2f}x {ratios[1]:.2f}x)" in table, (ratios, table)
    for row in ("Median ms / token", "p10 ms / token", "p90 ms / token", "Tokens generated | 8 | 8"):
        assert row in table, table
    assert "3 prompts × 8 tokens × 2 rounds" in table


def test_browser_chat_stream_panel_stop(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with app_page(app_url, errors) as page:
        header = page.locator("#header").inner_text()  # which engine serves, and how: app_server's default
        assert "Q8 engine, FBGEMM INT8" in header and "compiled decode step" in header, header
        box = page.locator("#message textarea")
        box.fill("Tell me about the moon in three sentences.")
        box.press("Enter")
        page.locator(BOT).last.wait_for(timeout=60_000)
        page.wait_for_function("document.querySelector('#chatbot').innerText.length > 40", timeout=60_000)
        page.wait_for_selector("#table:has-text('faster'), #table:has-text('slower')", timeout=180_000)
        table = page.locator("#table").inner_text()
        assert re.search(r"Median ms / token\s+[\d.]+\s+[\d.]+", table), table
        assert page.locator("#chart canvas, #chart svg").count() > 0
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
        (ARTIFACTS / "panel.txt").write_text(table)  # the numbers the screenshot shows, for the issue note

        # Stop mid-generation: the text stops growing, the earlier exchange stays, nothing shows an error, and
        # the panel gives the numbers of what was produced.
        first_answer = page.locator(BOT).first.inner_text()
        box.fill("Write a long story about a lighthouse keeper.")
        box.press("Enter")
        page.wait_for_function(
            f"document.querySelectorAll({BOT!r}).length >= 2 && "
            f"[...document.querySelectorAll({BOT!r})].pop().innerText.length > 20",
            timeout=60_000,
        )
        page.click("#stop")
        page.wait_for_selector("#table:has-text('Stopped')", timeout=30_000)
        stopped = page.locator(BOT).last.inner_text()
        wait_idle(app_url)  # the reply's last update (the one saying Stopped) is on the page: nothing follows
        assert page.locator(BOT).last.inner_text() == stopped and len(stopped) > 20
        assert page.locator(BOT).first.inner_text() == first_answer
        assert page.locator(BOT).count() == 2
        assert "error" not in page.locator("#chatbot").inner_text().lower()
        assert (
            page.locator("#chatbot .error, .toast-wrap .error, [data-testid='toast-body'].error").count() == 0
        )
        page.screenshot(path=str(ARTIFACTS / "stopped.png"), full_page=True)

        page.set_viewport_size({"width": 390, "height": 844})  # phone width
        page.wait_for_function("document.documentElement.clientWidth === 390")
        chat, panel = page.locator("#chatbot").bounding_box(), page.locator("#panel").bounding_box()
        assert panel["y"] >= chat["y"] + chat["height"], (chat, panel)  # the panel stacks under the chat
        assert panel["x"] >= 0 and panel["x"] + panel["width"] <= 390, panel
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the side
        page.screenshot(path=str(ARTIFACTS / "phone.png"), full_page=True)
    assert not errors, errors


def test_browser_stop_retry_clear_clicked_together(app_url):
    """Impatient clicks: Retry, Stop and Clear while a reply streams, in quick succession. The page ends empty
    with no error, the CPU is free, and the next message is answered normally."""
    errors: list[str] = []
    with app_page(app_url, errors) as page:
        box = page.locator("#message textarea")
        box.fill("Write a long story about a dragon.")
        box.press("Enter")
        page.wait_for_function(
            f"[...document.querySelectorAll({BOT!r})].pop()?.innerText.length > 10", timeout=60_000
        )
        for button in ("#retry", "#stop", "#retry", "#clear", "#stop", "#clear"):
            page.click(button)
        wait_idle(app_url)  # the CPU is freed after Stop/Clear
        page.wait_for_function(f"document.querySelectorAll({BOT!r}).length === 0")  # Clear came last
        box.fill(QUESTION)
        box.press("Enter")
        page.wait_for_selector("#table:has-text('faster'), #table:has-text('slower')", timeout=180_000)
        assert ANSWER in page.locator(BOT).last.inner_text()
        # the chat stayed empty: no late update of the cleared reply came back before or with this one
        assert page.locator(BOT).count() == 1 and page.locator('#chatbot [data-testid="user"]').count() == 1

        # the empty chat offers examples; a click sends one and it is answered
        page.click("#clear")
        example = page.locator("#chatbot button.example").first
        example.wait_for(timeout=30_000)
        asked = example.inner_text().strip()
        example.click()
        page.wait_for_function(
            f"[...document.querySelectorAll({BOT!r})].pop()?.innerText.length > 10", timeout=60_000
        )
        assert page.locator('#chatbot [data-testid="user"]').last.inner_text().strip() == asked
    assert not errors, errors


# The code's last line is longer than a phone is wide: the visitor's own message holds it, whatever the model
# answers on this CPU.
LONG_LINE = "    TABLE = [" + ", ".join(str(n) for n in range(60)) + "]"
CODE_MESSAGE = (
    "Explain __init__() here:\n```python\nclass A:\n    def __init__(self):\n        self.x = 1\n"
    + LONG_LINE
    + "\n```"
)
RACE_CLOCK = """() => new Promise(done => {
  // performance.now() of the first replayed frame and of the frame where each lane says it finished
  const seen = {};
  const watch = (id) => new MutationObserver(() => {
    const text = document.querySelector(id).innerText;
    if (!text.includes('finished at') && text.includes(' s')) {  // a frame of the replay, before the end
      if (seen.first === undefined) seen.first = performance.now();
      seen['started' + id] = true;
      seen['frames' + id] = (seen['frames' + id] || 0) + 1;
    }
    if (text.includes('finished at') && seen['started' + id] && seen[id] === undefined) seen[id] = performance.now();
    if (seen['#race-int8'] !== undefined && seen['#race-bf16'] !== undefined) done(seen);
  }).observe(document.querySelector(id), {childList: true, subtree: true, characterData: true});
  watch('#race-int8'); watch('#race-bf16');
  document.querySelector('#race-run').click();
})"""


@pytest.mark.parametrize("width", [1400, 390], ids=["desktop", "phone"])
def test_browser_live_counters_code_continue_and_race(app_url, width):
    """One reply watched closely: the counters move while it streams, code renders intact and can be copied
    mid-stream, Continue extends a stopped reply, and the race replays both answers in the order they were timed."""
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with app_page(app_url, errors) as page:
        page.set_viewport_size({"width": width, "height": 900})
        page.locator("#chatbot button.example").first.wait_for()
        box = page.locator("#message textarea")
        box.fill(CODE_MESSAGE)
        box.press("Enter")
        page.wait_for_selector("#live:has-text('writing')", timeout=60_000)
        first = page.locator("#live").inner_text()
        page.wait_for_function(f"document.querySelector('#live').innerText !== {first!r}", timeout=30_000)
        assert re.search(
            r"\d+ tokens · [\d.]+ tokens/s · context \d+ of 8,192", page.locator("#live").inner_text()
        )
        # copy while streaming: the user's message and the reply still being written each have a copy button
        assert page.locator("#chatbot button[title='Copy message']").count() == 2
        user = page.locator('#chatbot [data-testid="user"]').last
        assert "__init__()" in user.inner_text()  # not bold "init()"
        assert "def __init__(self):\n        self.x = 1" in user.locator("pre code").inner_text()
        page.click("#stop")
        page.wait_for_selector("#table:has-text('Stopped')", timeout=30_000)
        stopped = page.locator(BOT).last.inner_text()

        page.click("#continue")  # the same message grows: what was there stays, more follows
        page.wait_for_function(f"[...document.querySelectorAll({BOT!r})].pop().innerText.length > {len(stopped)}",
                               timeout=60_000)  # fmt: skip
        page.wait_for_selector("#race-int8:has-text('finished at')", timeout=180_000)
        continued = page.locator(BOT).last.inner_text()
        assert continued.startswith(stopped[: max(len(stopped) - 5, 1)]) and page.locator(BOT).count() == 1

        measured = {lane: float(re.search(r"finished at ([\d.]+) s", page.locator(lane).inner_text())[1])
                    for lane in ("#race-int8", "#race-bf16")}  # fmt: skip
        seen = page.evaluate(RACE_CLOCK, None)
        # the replay moves frame by frame (not straight to the end), and the model measured faster by more than a
        # few refresh intervals finishes first in the replay too (no wall-clock bound: a busy browser lags)
        assert all(seen["frames" + lane] >= 2 for lane in measured if measured[lane] > 1.0), seen
        (fast, t_fast), (slow, t_slow) = sorted(measured.items(), key=lambda kv: kv[1])
        if t_slow - t_fast > 1.0:
            assert seen[fast] < seen[slow], (measured, seen)
        page.screenshot(path=str(ARTIFACTS / f"race-{width}.png"), full_page=True)
        for part in ("#chart", "#race-int8", "#race-bf16"):
            box_ = page.locator(part).bounding_box()
            assert box_ and box_["width"] > 100 and box_["x"] + box_["width"] <= width + 1, (part, box_)
        # the long line scrolls inside its code block; the page itself is no wider than the screen
        code = user.locator("pre").first
        assert code.evaluate("e => e.scrollWidth > e.clientWidth") or width > 1000, code.bounding_box()
        assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert not errors, errors


def test_bench_times_the_app_panel_in_the_same_rounds(app_url, tmp_path):
    """`python -m quantize.bench --app URL`: the app's INT8 chat replies, over HTTP, timed from its chart, in
    the same interleaved rounds as the bench's own INT8 engine on the same folder and prompts."""
    import json

    from gradio_client import Client
    from test_bench import run_bench

    threads = Client(app_url, verbose=False).predict(api_name="/status")["threads"]
    assert threads == int(os.environ.get("Q8CHAT_THREADS", os.cpu_count()))  # the app runs on every core
    out = tmp_path / "bench.json"
    flags = ("--threads", str(threads), "--tokens", "8", "--rounds", "1", "--prompts", "1", "--no-peer")
    proc = run_bench(*flags, "--app", app_url, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = json.loads(out.read_text())["threads"][str(threads)]["models"]
    app, int8 = models["app"], models["int8"]
    assert 0 < app["median_ms"] and len(app["round_median_ms"]) == 1 and app["ttft_ms"] > 0
    ratio = app["round_median_ms"][0] / int8["round_median_ms"][0]
    assert f"app panel: {ratio:.2f}x the bench's INT8 ms per token" in proc.stdout, proc.stdout
