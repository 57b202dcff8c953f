"""The running app as one more engine in the bench's rounds: its INT8 chat replies over HTTP, timed by what its
panel shows rather than from outside, so the bench compares the app's own numbers with its in-process INT8."""

from __future__ import annotations

import torch

from quantize.errors import ModelError
from quantize.runtime import latency
from quantize.runtime.chat import DEFAULT_SYSTEM, SETTINGS


class AppPanel:
    """The running app, timed by what its panel shows: each generation is a chat message to its /chat API
    (greedy, the BF16 comparison off) and the Timing is rebuilt from the chart, TTFT then one gap per token.
    The app answers with its own system prompt and stops at eos, so a reply can be shorter than `new_tokens`."""

    def __init__(self, url: str, texts: dict[tuple, str], threads: int) -> None:
        from gradio_client import Client

        self.client, self.texts, self.system = Client(url, verbose=False), texts, DEFAULT_SYSTEM
        # the page's slider minimum; a warm-up asks for fewer
        self.fewest_tokens = SETTINGS["max_new_tokens"][0]
        status = self.client.predict(api_name="/status")
        if not status["ready"] or status["loading"] or status["chat_model"] is None:
            raise ModelError(
                f"the app at {url} is not ready to answer yet ({status['status'] or 'loading'})."
            )
        if status.get("threads") != threads:
            raise ModelError(
                f"the app at {url} runs {status.get('threads')} threads: pass --threads with that."
            )
        self.label = status["chat_model"]
        print(f"{latency.LABELS['app']}: {url}, chat model {self.label}")

    def time_generation(self, input_ids: torch.Tensor, new_tokens: int) -> latency.Timing:
        text = self.texts[tuple(input_ids[0].tolist())]
        tokens = max(new_tokens, self.fewest_tokens)
        out = self.client.predict(text, [], self.system, tokens, 0.0, 1.0, False, api_name="/chat")
        chart = out[2]
        # the chart's title carries the TTFT ("... INT8 <ms> ms ..."); its points are the per-token gaps
        ttft = float(chart["title"].split("INT8 ")[1].split(" ms")[0])
        gaps = [ms for _, ms, model in chart["value"]["data"] if model == "INT8" and ms is not None]
        timing = latency.Timing(0.0, [ttft / 1e3])
        for ms in gaps:
            timing.stamps.append(timing.stamps[-1] + ms / 1e3)
        return timing
