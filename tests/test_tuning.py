"""Accuracy-aware tuning through the whole command, on a random two-layer Qwen2 (served by the engine): the bar is
set from a first run's own trials, so that the recipe misses it and a later point of the search meets it."""

import json

import pytest
import torch
from conftest import TINY_LLAMA, run_cli
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.slow  # the whole command, several trials each
FAST = ("--skip-baseline", "--calibration-samples", "4", "--bench-tokens", "4", "--bench-rounds", "1")
# what a tail mode leaves in the loaded model (a Linear and the wrappers INC puts around it)
KINDS = {
    "dynamic": "quantized.dynamic",
    "bf16": "BF16ModuleWrapper",
    "fp32": "torch.nn.modules.linear.Linear",
}
LINEARS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"), "o_proj": ("o_proj",),
           "down_proj": ("down_proj",), "lm_head": ("lm_head",)}  # fmt: skip


def kinds(model, name: str) -> str:
    """The module at `name` and those INC nests in it (`.module`), by kind."""
    out, module = [], model.get_submodule(name)
    while module is not None:
        out.append(f"{type(module).__module__}.{type(module).__name__}")
        module = getattr(module, "module", None)
    return " ".join(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), **TINY_LLAMA)
    folder = tmp_path_factory.mktemp("tune") / "tiny"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quantize(tiny, out, *flags):
    proc = run_cli("--model", str(tiny), "--out", str(out), *FAST, *flags)
    report = out / "quantize_report.json"
    return proc, json.loads(report.read_text()) if report.is_file() else None


def test_search_meets_a_bar_the_recipe_misses_and_stops_when_the_budget_runs_out(tmp_path, tiny):
    from optimum.intel import INCModelForCausalLM

    # 1. An unreachable bar: the points are tried until the budget ends, none passes, the command says so.
    proc, walked = quantize(tiny, tmp_path / "all", "--min-top1", "1.0", "--tune-trials", "7")
    assert proc.returncode == 2 and "Tuning ended without a point that meets the bar" in proc.stderr
    trials = walked["tuning"]["trials"]
    assert len(trials) > 4 and not any(t["met"] for t in trials)
    assert len({t["point"] for t in trials}) == len(trials)  # no point tried twice
    first, later = trials[0]["top1_agreement"], [t["top1_agreement"] for t in trials[1:]]
    assert max(later) > first, "no point of the search does better than the recipe on this model"

    # 2. A bar between the recipe's top-1 and the best point's: the search stops at the first point over it.
    bar = (first + max(later)) / 2
    proc, report = quantize(tiny, tmp_path / "met", "--min-top1", f"{bar:.6f}", "--tune-trials", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stop = next(i for i, top1 in enumerate(later, 1) if top1 >= bar)
    assert stop >= 2, "the budget case below needs a search of at least two trials"
    tuned = report["tuning"]["trials"]
    assert [t["met"] for t in tuned] == [False] * stop + [True]
    assert [t["point"] for t in tuned] == [t["point"] for t in trials[: stop + 1]]
    model = INCModelForCausalLM.from_pretrained(tmp_path / "met").model
    chosen = dict(report["recipe"]["tail"])
    for role, mode in chosen.items():  # the folder holds the chosen point's model
        names = [n for n, _ in model.named_modules() if n.endswith(LINEARS[role])]
        found = {kinds(model, n) for n in names}
        assert names and all(KINDS[mode] in k for k in found), (role, mode, found)
        assert mode != "fp32" or not any("quantized" in k or "BF16" in k for k in found)

    # 3. The same bar with fewer trials than that: the budget runs out, the command says so and fails.
    proc, short = quantize(tiny, tmp_path / "short", "--min-top1", f"{bar:.6f}", "--tune-trials", str(stop))
    assert proc.returncode == 2 and "the budget ran out" in proc.stderr, proc.stderr[-2000:]
    assert len(short["tuning"]["trials"]) == stop and "Traceback" not in proc.stderr
