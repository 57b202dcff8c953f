"""Quality of a quantized model against its BF16 original, on held-out text the calibration never saw."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from quantize import machine
from quantize.runtime.generate import Sampling, stream
from quantize.runtime.prefixes import common_prefix

DATA = Path(__file__).parents[1] / "data"
# Windows of held-out text, each read as a chat is: PREFILL tokens as the prompt, the rest decoded one by one.
WINDOW = 128
PREFILL = 32
# And as a long chat reaches the model: LONG_WINDOW tokens prefilled in one pass (one forward, all logits).
LONG_WINDOW = 512
# The project's quality bar (issue #2): the INT8 model against BF16 on this held-out text.
QUALITY_BAR = {"max_perplexity_ratio": 1.10, "min_top1_agreement": 0.85}


@dataclass(frozen=True)
class HeldOut:
    """What quality is measured on: prose for perplexity and top-1, chat prompts for greedy and chat top-1."""

    text: str
    prompts: list[str]
    source: str  # said in the card


def held_out(path: Path | None = None) -> HeldOut:
    """The project's held-out set, or a maintainer's file: JSON chats (their user turns are the prompts, all their
    turns the prose) or plain text (the prose; the prompts stay the project's)."""
    if path is None:
        return HeldOut(heldout_text(), heldout_prompts(), "held-out English prose written for the project")
    raw = Path(path).read_text()
    try:
        chats = [c["messages"] for c in json.loads(raw)]
    except (ValueError, TypeError, KeyError):
        return HeldOut(raw, heldout_prompts(), f"the maintainer's text `{Path(path).name}`")
    prompts = [next(m["content"] for m in chat if m["role"] == "user") for chat in chats]
    prose = "\n\n".join(m["content"] for chat in chats for m in chat)
    return HeldOut(prose, prompts, f"the maintainer's {len(chats)} chats `{Path(path).name}`")


def heldout_text() -> str:
    return (DATA / "heldout_eval.txt").read_text()


def heldout_prompts() -> list[str]:
    return json.loads((DATA / "heldout_prompts.json").read_text())


def teacher_forced(
    decoder, ids: torch.Tensor, window: int = WINDOW, prefill: int = PREFILL
) -> tuple[float, torch.Tensor]:
    """Mean negative log-likelihood over non-overlapping windows, and the argmax token at every position.

    Each window is fed the way the app feeds a chat: the first `prefill` tokens in one forward pass (a prompt),
    then one token at a time with the KV cache (decoding). Static INT8 gives the same numbers either way; layers
    with dynamic activation scales see one token per call in decode, as they do when the app generates."""
    nll, n, top = 0.0, 0, []
    with torch.inference_mode():
        for x in windows(ids, window):
            cache = decoder.new_cache(x.shape[1])
            spans = [(0, min(prefill, x.shape[1] - 1))] + [(t, t + 1) for t in range(prefill, x.shape[1] - 1)]
            logits = torch.cat([decoder.forward(x[0, a:b], cache, all_logits=True) for a, b in spans])
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
            top.append(logits.argmax(-1))
    return nll / n, torch.cat(top)


def windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `window` tokens, each with the token that follows it (its last target)."""
    spans = [ids[:, s : s + window + 1] for s in range(0, ids.shape[1] - 1, window)]
    return [x for x in spans if x.shape[1] >= 2]


def greedy(decoder, ids: torch.Tensor, new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy answer, up to and including the end-of-turn token."""
    return [
        s.token_id
        for s in stream(
            decoder, ids, Sampling(max_new_tokens=new_tokens), eos_ids=frozenset() if eos is None else {eos}
        )
    ]


def follows(decoder, ids: torch.Tensor, answer: list[int]) -> list[int]:
    """The model's argmax at every step of a given answer: prompt prefilled, answer decoded token by token."""
    picks = []
    with torch.inference_mode():
        cache = decoder.new_cache(ids.shape[-1] + len(answer))
        x = ids.reshape(-1)
        for token in answer:
            picks.append(int(decoder.forward(x, cache)[-1].argmax()))
            x = torch.tensor([token])
    return picks


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def compare(
    openers: dict[str, Callable[[], object]],
    reference: str,
    tokenizer,
    held: HeldOut | None = None,
    max_tokens: int = 1024,
    greedy_tokens: int = 48,
) -> dict:
    """Perplexity of every model; top-1 agreement and greedy-continuation match of each against `reference`.

    `openers` give each model when called. They are opened one at a time, the reference first, and each is let go
    before the next is opened: the verification of a 7B model never holds its BF16 and INT8 weights together."""
    held = held or held_out()
    ids = tokenizer(held.text, return_tensors="pt").input_ids[:, :max_tokens]
    prompts = [prompt_ids(tokenizer, p) for p in held.prompts]
    seen: dict[str, dict] = {}
    for name in [reference, *(n for n in openers if n != reference)]:
        answers = seen[reference]["answers"] if seen else None
        seen[name] = _measure(openers[name](), ids, prompts, greedy_tokens, tokenizer.eos_token_id, answers)
        machine.release_memory()  # the model this opener gave, unreferenced now, leaves before the next one loads
    out = {
        "source": held.source,
        "eval_tokens": int(ids.shape[1]),
        "window": WINDOW,
        "prefill": PREFILL,
        "long_window": LONG_WINDOW,
        "greedy_tokens": greedy_tokens,
        "chat_prompts": len(prompts),
        "models": {},
    }
    ref = seen[reference]
    for name, m in seen.items():
        prefix = [common_prefix(a, b) / max(len(b), 1) for a, b in zip(m["answers"], ref["answers"])]
        out["models"][name] = {
            "perplexity": math.exp(m["nll"]),
            "perplexity_ratio": math.exp(m["nll"] - ref["nll"]),
            "top1_agreement": (m["top"] == ref["top"]).float().mean().item(),
            "long_perplexity_ratio": math.exp(m["long_nll"] - ref["long_nll"]),
            "long_top1_agreement": (m["long_top"] == ref["long_top"]).float().mean().item(),
            "chat_top1_agreement": m["chat_same"] / max(sum(len(a) for a in ref["answers"]), 1),
            "greedy_prefix_match": sum(prefix) / len(prefix),
            "engine": m["engine"],
        }
    return out


def _measure(model, ids, prompts: list, greedy_tokens: int, eos: int, reference_answers: list | None) -> dict:
    """One model's side of `compare`: both modes on the prose, its greedy answers, and (for a model that is not the
    reference) how often it picks the reference's token along the reference's own greedy answers. A model that
    measures itself a cheaper way (reference.ByBlock, which runs block by block) brings its own methods."""
    forced = getattr(model, "teacher_forced", None) or (lambda *a: teacher_forced(model, *a))
    nll, top = forced(ids)
    long_nll, long_top = forced(ids, LONG_WINDOW, LONG_WINDOW)
    if hasattr(model, "greedy_answers"):
        answers = model.greedy_answers(prompts, greedy_tokens, eos)
    else:
        answers = [greedy(model, p, greedy_tokens, eos) for p in prompts]
    if reference_answers is None:  # the reference, along its own greedy answers, picks every token
        same = sum(len(a) for a in answers)
    else:
        same = sum(
            a == b for p, ans in zip(prompts, reference_answers) for a, b in zip(follows(model, p, ans), ans)
        )
    return {"nll": nll, "top": top, "long_nll": long_nll, "long_top": long_top, "answers": answers,
            "chat_same": same, "engine": getattr(model, "label", type(model).__name__)}  # fmt: skip


def worst_perplexity_ratio(m: dict) -> float:
    """Of decoding and the long prompt (reports from before the long mode have decoding alone)."""
    return max(m["perplexity_ratio"], m.get("long_perplexity_ratio", 0.0))


def worst_top1(m: dict) -> float:
    return min(m["top1_agreement"], m.get("long_top1_agreement", 1.0))


def against_bar(int8: dict, bar: dict = QUALITY_BAR) -> dict:
    """The bar, and whether `int8` (one model's entry of `compare`) meets each part of it in both modes."""
    perplexity_ok = worst_perplexity_ratio(int8) <= bar["max_perplexity_ratio"]
    top1_ok = worst_top1(int8) >= bar["min_top1_agreement"]
    return {**bar, "perplexity_ok": perplexity_ok, "top1_ok": top1_ok, "met": perplexity_ok and top1_ok}
