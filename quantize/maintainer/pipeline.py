"""The maintainer step as a list of named stages over one context: quantize, a baseline without SmoothQuant, the
quality and the speed against BF16, the export for vLLM and its quality there, the card, and the move into --out.

Stages that measure are recorded in <out>.partial/stages.json with a fingerprint of the arguments and the code;
a rerun with the same arguments picks up after the last recorded stage. The finished folder replaces --out in one
step (files.replace_dir), so --out never holds a mix of old and new files.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantize import engine_file, files, machine, models
from quantize.errors import ModelError
from quantize.maintainer import (
    blockwise,
    calibration,
    card,
    evaluate,
    export,
    recipe,
    reference,
    tune,
    vllm_quality,
)
from quantize.models import EXPORT_DIR
from quantize.runtime import decoders, latency
from quantize.runtime.decoders import HFDecoder

log = logging.getLogger("q8chat")


class Record:
    """Which stages of this exact run are done, and what they measured; kept in <out>.partial/stages.json."""

    def __init__(self, partial: Path, key: str) -> None:
        self.file = partial / "stages.json"
        state = json.loads(self.file.read_text()) if self.file.is_file() else {}
        if state.get("fingerprint") != key:
            shutil.rmtree(partial, ignore_errors=True)
            state = {"fingerprint": key, "done": {}}
        partial.mkdir(parents=True, exist_ok=True)
        self.state = state

    @property
    def done(self) -> dict:
        return self.state["done"]

    def add(self, name: str, value: dict) -> None:
        self.done[name] = value
        files.write_file(self.file, json.dumps(self.state, indent=1))


def fingerprint(args: argparse.Namespace, source: Path) -> str:
    """What a rerun must match to pick up finished stages: the arguments, the inputs they name (the BF16 model's
    files by name, size and time, the calibration and held-out files' bytes) and the build's code."""
    keys = ["model", "revision", "recipe", "alpha", "calibration_samples", "calibration_file", "eval_file", "bench_tokens",
            "bench_rounds", "skip_baseline", "max_ppl_ratio", "min_top1", "tune_trials", "tune_minutes"]  # fmt: skip
    blob = json.dumps({k: str(getattr(args, k)) for k in keys}, sort_keys=True)
    # a code change (recipe, evaluation, engine) must not resume onto stages an older version produced; the page's
    # code and the tools only read the result, and their changes must not throw a maintainer's finished stages away
    code = b"".join(p.read_bytes() for p in build_code())
    own = b"".join(p.read_bytes() for p in (args.calibration_file, args.eval_file) if p is not None)
    weights = sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(source).iterdir() if f.is_file()
    )
    return hashlib.sha256(blob.encode() + code + own + json.dumps(weights).encode()).hexdigest()[:16]


PACKAGE = Path(__file__).parents[1]


def build_code() -> list[Path]:
    """The modules a stage's result depends on: every file of the maintainer step (subfolders included) and,
    through their imports (function-level ones too), the package's modules they reach: the runtime it measures
    with and the shared leaves; not the page or the tools, which the step never imports."""
    todo = sorted((PACKAGE / "maintainer").rglob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path)
    return sorted(seen)


def imported_files(path: Path) -> list[Path]:
    """The package's files that `path` imports: `quantize.a.b` is quantize/a/b.py or quantize/a/b/__init__.py, and
    `from quantize.a import b` may name the module b."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    parts = [n.split(".")[1:] for n in names if n == "quantize" or n.startswith("quantize.")]
    files = [PACKAGE.joinpath(*p).with_suffix(".py") for p in parts if p] + [
        PACKAGE.joinpath(*p, "__init__.py") for p in parts
    ]
    return [f for f in files if f.is_file()]


@dataclass
class Build:
    """What the stages of one run share."""

    args: argparse.Namespace
    recipe: recipe.Recipe
    record: Record
    tokenizer: object
    source: Path  # the BF16 model's folder
    base_id: str | None  # the Hub id the card names as the base model (None: a local folder without one)
    model_type: str

    @functools.cached_property
    def bf16(self):
        """The transformers BF16 model, kept for the stages that share it (INC's whole-model path, the baseline)."""
        return self.load_bf16()

    def load_bf16(self):
        return models.load_bf16(self.source, trust_remote_code=self.args.trust_remote_code)

    def shared_or_new_bf16(self):
        """The shared BF16 model when an earlier stage of this process loaded it, else one for the caller alone."""
        return self.__dict__.get("bf16") or self.load_bf16()

    @property
    def named_source(self) -> str:
        """The BF16 model as the report names it: its Hub id, or a local folder's name (never where it lies)."""
        local = self.args.model and Path(self.args.model).expanduser().exists()
        return Path(self.args.model).name if local else self.args.model or models.DEFAULT_MODEL_HUB_ID

    @property
    def partial(self) -> Path:
        return self.record.file.parent

    @property
    def int8_dir(self) -> Path:
        return self.partial / "int8"

    @property
    def bar(self) -> dict:
        return {"max_perplexity_ratio": self.args.max_ppl_ratio, "min_top1_agreement": self.args.min_top1}

    def calibration(self, samples: int | None = None) -> list:
        chats = self.args.calibration_file or calibration.CHATS
        return calibration.calibration_ids(self.tokenizer, samples or self.args.calibration_samples, chats)


def quantize_stage(b: Build) -> dict:
    """The recipe, judged by Neural Compressor against the bar, and when it misses the tuning search (tune.py);
    with --tune-trials 1 the recipe alone, unjudged (the quality stage still measures it against the bar)."""
    own = b.args.calibration_file
    source = (
        f"the maintainer's `{own.name}`" if own else "chats written for the project, in the chat template"
    )
    if b.args.tune_trials == 1 and blockwise.takes(b.source, b.model_type, b.recipe):
        calib = b.calibration()
        work = b.partial / "blocks"
        summary = blockwise.quantize_by_block(b.source, calib, b.recipe, work, b.int8_dir, b.tokenizer)
        recipe.require_smoothquant(b.recipe, summary["smoothquant"])
        shutil.rmtree(work, ignore_errors=True)
        return {**summary, "calibration_samples": len(calib), "calibration_source": source}
    if b.args.tune_trials == 1:
        calib = b.calibration()
        result = recipe.quantize_to_folder(b.bf16, b.tokenizer, calib, b.recipe, b.int8_dir)
        return {**result.summary(), "calibration_samples": len(calib), "calibration_source": source}
    judge = tune.Judge(b.bf16, b.tokenizer, evaluate.held_out(b.args.eval_file), b.bar)
    budget = tune.Budget(b.args.tune_trials, b.args.tune_minutes)
    start = tune.Point(b.recipe, b.args.calibration_samples)
    outcome = tune.search(b.bf16, b.calibration, start, judge, budget, b.partial / "inc-tune")
    try:
        recipe.check_smoothquant(outcome.result)
        recipe.save_int8(outcome.result, b.int8_dir, b.tokenizer, b.bf16)
    finally:
        shutil.rmtree(b.partial / "inc-tune", ignore_errors=True)
    samples = len(b.calibration(outcome.chosen.point.samples))  # a short file gives fewer than asked
    return {**outcome.result.summary(), "calibration_samples": samples, "calibration_source": source,
            "tuning": outcome.summary()}  # fmt: skip


def bf16_reference(b: Build) -> Callable[[], object]:
    """The quality stages' BF16 reference: transformers' model whole, or, for a model built block by block, run
    block by block too (reference.ByBlock), so verifying a 7B model holds one block of its BF16, not 14.8 GB."""
    if "bf16" not in b.__dict__ and blockwise.takes(b.source, b.model_type, b.recipe):
        return lambda: reference.ByBlock(b.source)
    return lambda: HFDecoder(b.shared_or_new_bf16(), "transformers BF16")


def baseline_stage(b: Build) -> dict:
    """The shipped recipe without smoothing (recipe.without_smoothing), built the way the shipped model is and
    served the same way: the card's measure of what SmoothQuant buys."""
    base = recipe.without_smoothing(b.recipe)
    work = b.partial / "inc-base"
    bf16 = {"bf16": bf16_reference(b)}
    held = evaluate.held_out(b.args.eval_file)
    if b.args.tune_trials == 1 and blockwise.takes(b.source, b.model_type, base):
        blockwise.quantize_by_block(
            b.source, b.calibration(), base, work / "blocks", work / "int8", b.tokenizer
        )
        openers = bf16 | {"int8_no_sq": lambda: decoders.open_int8(work / "int8")}
        quality = evaluate.compare(openers, "bf16", b.tokenizer, held)
    else:
        result = recipe.quantize(b.bf16, b.calibration(), base, work)
        with decoders.served(
            result.model, "INT8 no SQ"
        ) as int8_no_sq:  # the kernels the shipped INT8 runs on
            quality = evaluate.compare(bf16 | {"int8_no_sq": lambda: int8_no_sq}, "bf16", b.tokenizer, held)
    shutil.rmtree(work, ignore_errors=True)
    return {"recipe": base.name, **quality["models"]["int8_no_sq"]}


def quality_stage(b: Build) -> dict:
    """BF16 first, then INT8, one at a time: the BF16 model is loaded for this stage alone (unless the whole-model
    quantize stage already holds it; run block by block for a block-built model: bf16_reference) and let go before
    the INT8 model is opened."""
    openers = {
        "bf16": bf16_reference(b),
        "int8": lambda: decoders.open_int8(b.int8_dir),
    }  # INT8 as the app serves it
    if engine_file.has_engine_file(b.int8_dir) and (b.int8_dir / "inc_config.json").is_file():
        # the card offers INC's loader too: measured on the same text, not vouched for by the engine's numbers
        openers["int8_inc"] = lambda: HFDecoder(models.load_inc_int8(b.int8_dir), "INCModelForCausalLM")
    quality = evaluate.compare(openers, "bf16", b.tokenizer, evaluate.held_out(b.args.eval_file))
    return {**quality, "int8_engine": quality["models"]["int8"]["engine"]}


def speed_stage(b: Build) -> dict:
    """INT8 against BF16 run by the same loop (the engine), interleaved, so the gain is quantization's; INT8 alone,
    with the sentence that says why, when the two do not fit in memory together (the app's rule)."""
    from tqdm import tqdm

    prompts = [evaluate.prompt_ids(b.tokenizer, p) for p in evaluate.heldout_prompts()[:2]]
    bf16_bytes = decoders.weight_file_bytes(b.source)
    bf16_not_timed = machine.why_pair_does_not_fit(bf16_bytes, decoders.weight_file_bytes(b.int8_dir))
    timed = {"int8": decoders.open_int8(b.int8_dir)}
    if not bf16_not_timed:
        timed["bf16"] = decoders.open_bf16(b.source, trust_remote_code=b.args.trust_remote_code)
    rounds, tokens = b.args.bench_rounds, b.args.bench_tokens
    with tqdm(total=rounds * len(prompts) * len(timed), desc="timing", leave=False) as bar:
        speed = latency.interleaved(timed, prompts, tokens, rounds, progress=bar)
    speed["cpu"] = machine.describe_cpu().asdict()
    speed["weight_bytes"] = {"bf16": bf16_bytes} | {n: d.weight_bytes for n, d in timed.items()}
    speed["engines"] = {n: d.label for n, d in timed.items()}
    speed["bf16_not_timed"] = bf16_not_timed
    return speed


def export_stage(b: Build) -> None:
    """The compressed-tensors folder vLLM serves (maintainer/export.py), made from the engine's file where there is one
    (a static-INT8 recipe's model has none: only INC's loader runs it)."""
    if engine_file.has_engine_file(b.int8_dir):
        export.write_export(b.int8_dir)


def vllm_stage(b: Build) -> dict:
    """The export served by vLLM against vLLM on the BF16 original (maintainer/vllm_quality.py): the card's vLLM row.
    Without a vLLM venv (--vllm-python) or an export, the record says why it was not measured."""
    w8a8 = b.int8_dir / EXPORT_DIR
    if not b.args.vllm_python:
        return {"skipped": f"no vLLM venv given (--vllm-python or {vllm_quality.VENV_ENV})"}
    if not (w8a8 / "config.json").is_file():
        return {"skipped": "no export: only INC's loader runs this recipe's model"}
    held = evaluate.held_out(b.args.eval_file)
    try:
        return vllm_quality.measure(b.args.vllm_python, w8a8, Path(b.source), b.tokenizer, held)
    except (
        ModelError
    ) as e:  # the INT8 model is built and verified: vLLM's failure is said on the card, not fatal
        log.warning("%s", e)
        return {"skipped": str(e)}


def card_stage(b: Build) -> None:
    report = card.build_report(
        b.record.done,
        b.recipe,
        b.base_id,
        b.named_source,
        b.int8_dir,
        b.bar,
        default_model=b.args.model is None,
    )
    files.write_file(b.int8_dir / "quantize_report.json", json.dumps(report, indent=1))
    card.write_card(report, b.int8_dir)


def publish_stage(b: Build) -> None:
    files.replace_dir(b.int8_dir, b.args.out)
    shutil.rmtree(b.partial, ignore_errors=True)


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # shown next to the stage bar
    run: Callable[[Build], dict | None]
    recorded: bool = True  # its result is kept in the record, and a rerun skips it
    skip_flag: str | None = None  # the argument that leaves it out


STAGES = [
    Stage("quantize", "calibrate + SmoothQuant INT8", quantize_stage),
    Stage("baseline", "INT8 without SmoothQuant", baseline_stage, skip_flag="skip_baseline"),
    Stage("quality", "perplexity, top-1, greedy match", quality_stage),
    Stage("speed", "INT8 vs BF16 decode, interleaved", speed_stage),
    Stage("export", "compressed-tensors folder for vLLM", export_stage, recorded=False),
    Stage("vllm", "the export served by vLLM: quality", vllm_stage),
    Stage("card", "model card", card_stage, recorded=False),
    Stage("publish", "move into place", publish_stage, recorded=False),
]


def run_stages(b: Build, bar) -> None:
    """Every stage in order, each once: recorded ones a rerun has already done are skipped."""
    for stage in STAGES:
        bar.set_description(f"{stage.name}: {stage.what}")
        skipped = stage.skip_flag and getattr(b.args, stage.skip_flag)
        again = "skipped" in (b.record.done.get(stage.name) or {})  # not measured then: perhaps now (vLLM)
        if stage.recorded and not skipped and (stage.name not in b.record.done or again):
            # the process's high-water mark by the end of the stage: the first stage to reach the top raised it
            b.record.add(stage.name, {**stage.run(b), "peak_rss_bytes": machine.peak_rss_bytes()})
        elif not stage.recorded:
            stage.run(b)
        machine.release_memory()  # a stage's models are gone: the next one starts from the BF16 model alone
        bar.update(1)
