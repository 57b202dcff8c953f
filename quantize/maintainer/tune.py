"""Accuracy-aware tuning: when the recipe misses the quality bar, search for a point that meets it.

Neural Compressor judges every trial: `PostTrainingQuantConfig` gets an `AccuracyCriterion` and a
`TuningCriterion`, and `INCQuantizer` an `eval_fn` (`Judge`) built from the project's held-out measure
(evaluate.teacher_forced: perplexity and top-1 against BF16). The points are walked here, one INC run each, because
in Neural Compressor 3.7.1 a SmoothQuant config ends tuning at its first trial that misses the criterion
(strategy/strategy.py: `early_stop_sq_tuning_process` is set whenever smooth_quant is on, and `stop()` runs after
every trial), so INC's own alpha list and per-op fallback never get past trial 1.

The walk (SEARCH) changes one thing at a time, keeping the best point so far: SmoothQuant's alpha, then what the
Linears without a norm run (dynamic INT8 -> BF16 -> FP32, slower each step), then the calibration size. It stops at
the first point INC's criterion passes, or when the maintainer's budget of trials or minutes runs out.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantize import models
from quantize.maintainer import evaluate, recipe
from quantize.runtime import decoders
from quantize.runtime.decoders import HFDecoder

# What the walk changes, in order; a value equal to the best point's is skipped.
SEARCH = [
    ("alpha", (0.5, 0.75, 0.9, "auto")),
    (
        "tail",
        (
            recipe.tail_modes(o_proj="dynamic", down_proj="bf16", lm_head="dynamic", qkv_gate_up="dynamic"),
            recipe.tail_modes(o_proj="dynamic", down_proj="bf16", lm_head="bf16", qkv_gate_up="dynamic"),
            recipe.tail_modes(o_proj="fp32", down_proj="fp32", lm_head="fp32"),
        ),
    ),
    ("samples", (2, 4)),  # times --calibration-samples
]


@dataclass(frozen=True)
class Budget:
    trials: int
    minutes: float


@dataclass(frozen=True)
class Point:
    recipe: recipe.Recipe
    samples: int

    @property
    def key(self) -> tuple:
        """What the point quantizes with (not what it is called)."""
        return dataclasses.replace(self.recipe, name="", description=""), self.samples

    def describe(self) -> str:
        tail = ", ".join(f"{role} {mode}" for role, mode in self.recipe.tail) or "all static INT8"
        return f"alpha {self.recipe.alpha}; {tail}; {self.samples} calibration samples"


@dataclass
class Trial:
    point: Point
    perplexity_ratio: float
    top1_agreement: float
    score: float  # Judge's: the share of the bar met, at most 1
    met: bool  # Neural Compressor's AccuracyCriterion passed it
    seconds: float

    def row(self) -> dict:
        return {
            "point": self.point.describe(),
            "perplexity_ratio": self.perplexity_ratio,
            "top1_agreement": self.top1_agreement,
            "met": self.met,
            "seconds": round(self.seconds, 1),
        }


# (window, prefill) of the quality stage's two modes (evaluate.compare)
MODES = {"decode": (evaluate.WINDOW, evaluate.PREFILL), "long": (evaluate.LONG_WINDOW, evaluate.LONG_WINDOW)}


class Judge:
    """INC's eval_fn: a candidate's perplexity ratio and top-1 agreement against BF16 on the held-out text, as
    one score, the share of the bar met, at most 1: min(max ratio / ratio, top-1 / min top-1, 1). The FP32
    baseline INC measures first scores 1, so INC's criterion "no loss against the baseline" is "meets the bar"."""

    def __init__(self, bf16: torch.nn.Module, tokenizer, held: evaluate.HeldOut, bar: dict) -> None:
        self.ids = tokenizer(held.text, return_tensors="pt").input_ids[:, :1024]
        self.bar, self.tail, self.family = bar, (), recipe.family_of(bf16)
        reference = HFDecoder(bf16, "BF16")
        self.refs = {mode: evaluate.teacher_forced(reference, self.ids, *w) for mode, w in MODES.items()}
        self.last: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # ratio, top-1, score

    def __call__(self, model: torch.nn.Module) -> float:
        if not any("quantized" in type(m).__module__ for m in model.modules()):
            return 1.0  # INC's FP32 baseline: the score is the share of the bar met, and it meets it
        recipe.release_inc_leftovers()  # INC is done with its trace and capability query: free their FP32 copies
        ratio, top1 = self.measure(self.shipped(model))
        bar = self.bar
        score = min(bar["max_perplexity_ratio"] / ratio, top1 / bar["min_top1_agreement"], 1.0)
        self.last = (ratio, top1, score)
        return score

    def shipped(self, model: torch.nn.Module) -> torch.nn.Module:
        """The candidate as it will ship: INC left the tail's Linears in FP32; they get the trial's modes."""
        # without drop_borrowed_methods the copy would take INC's FP32 originals along
        model = copy.deepcopy(recipe.drop_borrowed_methods(model))
        ops = {(n, "Linear"): {} for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        trial = recipe.Recipe("trial", tail=self.tail)
        recipe.apply_tail(model, {"op": ops}, trial, self.family)
        models.outputs_for(model.config, models.FOR_LOADERS)
        return model

    def measure(self, model: torch.nn.Module) -> tuple[float, float]:
        """The worse perplexity ratio and top-1 of the candidate as the app serves it (`decoders.served`), of
        decoding and a long prompt: the quality stage measures the saved folder the same way, against the bar."""
        ratios, tops = [], []
        with decoders.served(model, "candidate") as decoder:
            for mode, window in MODES.items():
                nll, top = evaluate.teacher_forced(decoder, self.ids, *window)
                ref_nll, ref_top = self.refs[mode]
                ratios.append(math.exp(nll - ref_nll))
                tops.append((top == ref_top).float().mean().item())
        return max(ratios), min(tops)


def walk(start: Point, trials: list[Trial]):
    """The points to try: `start`, then SEARCH one dimension at a time from the best trial so far."""
    yield start
    for name, values in SEARCH:
        for value in values:
            best = max(trials, key=lambda t: t.score).point
            if name == "samples":
                point = dataclasses.replace(best, samples=start.samples * value)
            else:
                tuned = dataclasses.replace(best.recipe, name=f"{start.recipe.name}, tuned", **{name: value})
                point = dataclasses.replace(best, recipe=tuned)
            if all(t.point.key != point.key for t in trials):
                yield point


@dataclass
class Outcome:
    result: recipe.QuantizeResult  # the point that met the bar, or the best one tried
    chosen: Trial  # its trial
    trials: list[Trial]
    met: bool
    stopped: str  # why the walk ended, one sentence

    def summary(self) -> dict:
        minutes = sum(t.seconds for t in self.trials) / 60
        return {"met": self.met, "stopped": self.stopped, "chosen": self.chosen.point.describe(),
                "trials": [t.row() for t in self.trials], "minutes": round(minutes, 1)}  # fmt: skip


def search(
    bf16: torch.nn.Module,
    calibration_for: Callable[[int], list[torch.Tensor]],
    start: Point,
    judge: Judge,
    budget: Budget,
    workdir: Path,
) -> Outcome:
    """Walk the points until INC's criterion passes one or the budget runs out. The best result so far keeps its
    INC work folder (save_int8 copies INC's config files from it)."""
    trials: list[Trial] = []
    best: tuple[recipe.QuantizeResult, Trial] | None = None
    began = time.perf_counter()
    for point in walk(start, trials):
        spent = (time.perf_counter() - began) / 60
        if len(trials) >= budget.trials or spent >= budget.minutes:
            said = f"{len(trials)} trials, {spent:.1f} of {budget.minutes:g} minutes"
            return Outcome(*best, trials, False, f"the budget ran out ({said}) before a point met the bar")
        judge.tail = point.recipe.tail
        work = Path(workdir) / f"trial-{len(trials) + 1}"
        result = recipe.quantize(bf16, calibration_for(point.samples), point.recipe, work, judge)
        trials.append(Trial(point, *judge.last, bool(result.criterion_met), result.seconds))
        if best is None or trials[-1].score > best[1].score:
            if best is not None:
                shutil.rmtree(best[0].workdir, ignore_errors=True)
            best = (result, trials[-1])
        else:
            shutil.rmtree(work, ignore_errors=True)
        if result.criterion_met:
            return Outcome(*best, trials, True, f"trial {len(trials)} met the bar")
    return Outcome(*best, trials, False, f"every point of the search was tried ({len(trials)} trials)")
