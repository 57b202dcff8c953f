"""The quantization recipe: Neural Compressor's SmoothQuant, through Optimum Intel's INCQuantizer.

What the documented recipe gives, and why this one differs (each point re-checked against INC's source here):
  * `folding=True` is set explicitly: the default (`folding=False`) takes INC's QDQ path, which is fake
    quantization (FP32 weights and GEMMs wrapped in quantize/dequantize).
  * `config.return_dict=False` while quantizing: otherwise INC's jit trace fails and SmoothQuant is silently
    skipped. We prove it ran by reading INC's own "N out of M layers could be absorbed" line and by checking that
    the RMSNorm weights actually changed (that is where folding puts the smoothing scales).
  * Tied embeddings are untied first: INC scales lm_head in place, which would also scale the input embeddings.
  * Activations are calibrated with minmax, not INC's default KL: KL clips the few huge activation channels a
    small Llama depends on (on SmolLM2-135M: perplexity x1.20 with KL vs x1.03 with minmax, FP32 tail).
  * o_proj, down_proj and lm_head have no norm in front of them, so SmoothQuant cannot fold a scale for them
    and per-tensor static INT8 wrecks them (down_proj inputs carry the largest outliers). INC keeps them out of
    static INT8 (`op_name_dict`); the recipe's `tail` then says what each runs instead — FP32, BF16 through
    INC's own BF16 wrapper, or INC's *dynamic* INT8 quant mode (FBGEMM, an activation scale per call, i.e. per
    token in decode). Both are written into INC's tuning config (`bf16_ops_list`, per-op `quant_mode`), so
    `INCModelForCausalLM.from_pretrained` rebuilds exactly the same graph.
  * lm_head does follow a norm (the final one), but INC's trace does not pair them, so the recipe applies
    SmoothQuant's scaling to that pair itself before INC runs (`smooth_pairs`). With it lm_head can be dynamic
    INT8 within the quality bar; in BF16 its 49152x576 GEMV alone was ~4 ms of a ~30 ms INT8 token.
`python -m quantize.tools.frontier` measures every variant below; DEFAULT_RECIPE is the fastest one that meets the
quality bar on the real default model.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from quantize import engine_file, files, models
from quantize.errors import ModelError
from quantize.families import FAMILIES, Family, linear_regex, pair


def family_of(model: nn.Module) -> Family:
    return FAMILIES[model.config.model_type]


@dataclass(frozen=True)
class Recipe:
    """One point of the quality/speed frontier."""

    name: str
    smooth_quant: bool = True
    alpha: float | str = 0.5  # SmoothQuant migration strength, or "auto" (INC searches per layer)
    # role (families.ROLES) -> what its Linears run instead of static INT8: "fp32", "dynamic" (FBGEMM INT8, scale per call) or
    # "bf16" (INC's BF16 wrapper)
    tail: tuple[tuple[str, str], ...] = ()
    # INC's default for Linear activations is KL calibration, which clips the outliers LLMs depend on.
    activation_algorithm: str = "minmax"
    # SmoothQuant for the pairs INC cannot absorb (families.PAIRS: lm_head, down_proj, o_proj), done here the same
    # way before INC runs: the producer's output channels scaled down, the consumer's input columns up.
    smooth_pairs: tuple[str, ...] = ()
    pair_alpha: float | None = (
        None  # alpha for those pairs (default: `alpha`); down_proj's outliers want more
    )
    description: str = ""


def tail_for(recipe: Recipe, family: Family) -> tuple[tuple[str, str], ...]:
    """The recipe's tail on this family: the family's float_roles in BF16 whatever the recipe says."""
    return tuple((dict(recipe.tail) | {role: "bf16" for role in family.float_roles}).items())


def tail_modes(
    o_proj: str, down_proj: str, lm_head: str, qkv_gate_up: str | None = None
) -> tuple[tuple[str, str], ...]:
    """A recipe's `tail`: what each role of Linears (families.ROLES) runs instead of static INT8 (None: static INT8)."""
    inputs = (("qkv", qkv_gate_up), ("gate_up", qkv_gate_up)) if qkv_gate_up else ()
    return inputs + (("o_proj", o_proj), ("down_proj", down_proj), ("lm_head", lm_head))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "sq-static-all-kl",
            activation_algorithm="kl",
            description="SmoothQuant + static INT8 everywhere, INC's default KL calibration (the documented "
            "recipe, made real with folding)",
        ),
        Recipe("sq-static-all", description="as sq-static-all-kl with minmax calibration"),
        Recipe(
            "static-no-sq",
            smooth_quant=False,
            description="static INT8 everywhere, no SmoothQuant",
        ),
        Recipe(
            "sq-fp32-tail",
            tail=tail_modes(o_proj="fp32", down_proj="fp32", lm_head="fp32"),
            description="SmoothQuant static INT8; o_proj, down_proj, lm_head kept FP32 (the obvious repair)",
        ),
        Recipe(
            "sq-bf16-tail",
            tail=tail_modes(o_proj="bf16", down_proj="bf16", lm_head="bf16"),
            description="SmoothQuant static INT8; o_proj, down_proj, lm_head in BF16",
        ),
        Recipe(
            "sq-dynamic-all",
            tail=tail_modes(
                o_proj="dynamic",
                down_proj="dynamic",
                lm_head="dynamic",
                qkv_gate_up="dynamic",
            ),
            description="SmoothQuant folded, every Linear dynamic INT8",
        ),
        Recipe(
            "sq-dynamic",
            tail=tail_modes(
                o_proj="dynamic",
                down_proj="bf16",
                lm_head="bf16",
                qkv_gate_up="dynamic",
            ),
            description="SmoothQuant folded; q/k/v/o/gate/up dynamic INT8 (activation scale per token in "
            "decode); down_proj and lm_head BF16",
        ),
        Recipe(
            "sq-dynamic-lm",
            tail=tail_modes(
                o_proj="dynamic",
                down_proj="bf16",
                lm_head="dynamic",
                qkv_gate_up="dynamic",
            ),
            description="as sq-dynamic with lm_head dynamic INT8 too (BF16 GEMV of the 49152x576 lm_head is "
            "~4 ms of a token here); only down_proj BF16",
        ),
        Recipe(
            "sq-dynamic-lm-smooth",
            tail=tail_modes(
                o_proj="dynamic",
                down_proj="bf16",
                lm_head="dynamic",
                qkv_gate_up="dynamic",
            ),
            smooth_pairs=("lm_head",),
            description="as sq-dynamic-lm, with SmoothQuant's scaling applied to lm_head too (INC does not "
            "absorb it)",
        ),
        Recipe(
            "sq-dynamic-all-smooth",
            alpha=0.75,
            tail=tail_modes(
                o_proj="dynamic",
                down_proj="dynamic",
                lm_head="dynamic",
                qkv_gate_up="dynamic",
            ),
            smooth_pairs=("lm_head", "down_proj", "o_proj"),
            description="every Linear dynamic INT8, with SmoothQuant's scaling (alpha 0.75) also applied to the "
            "pairs INC does not absorb: final norm->lm_head, up_proj->down_proj, v_proj->o_proj",
        ),
        Recipe(
            "no-sq-dynamic",
            smooth_quant=False,
            tail=tail_modes(
                o_proj="dynamic",
                down_proj="bf16",
                lm_head="bf16",
                qkv_gate_up="dynamic",
            ),
            description="as sq-dynamic without SmoothQuant (shows what smoothing buys)",
        ),
    ]
}
DEFAULT_RECIPE = "sq-dynamic-all-smooth"


def without_smoothing(rec: Recipe) -> Recipe:
    """The card's baseline for `rec`: the same kernels and tail (every Linear as `rec` runs it), nothing smoothed,
    neither by INC nor in the extra pairs; what SmoothQuant buys is the difference between the two."""
    return replace(
        rec,
        name=f"{rec.name}-without-sq",
        smooth_quant=False,
        smooth_pairs=(),
        pair_alpha=None,
        description=f"{rec.name} without SmoothQuant: the same kernels and tail, nothing smoothed",
    )


@dataclass
class QuantizeResult:
    model: nn.Module  # the quantized transformers model (INT8 modules inside)
    q_config: dict  # INC's tuning config, as saved in pytorch_model.bin["best_configure"]
    recipe: Recipe
    smoothquant: dict = field(default_factory=dict)  # proof that smoothing was applied
    modules: dict = field(default_factory=dict)  # counts of module types after quantization
    seconds: float = 0.0
    workdir: Path | None = None  # where INCQuantizer wrote config.json, inc_config.json, pytorch_model.bin
    criterion_met: bool | None = None  # INC's AccuracyCriterion on this trial (None: not judged)

    def summary(self) -> dict:
        return run_summary(self.recipe, family_of(self.model), self.smoothquant, self.modules, self.seconds)


def run_summary(recipe: Recipe, family: Family, smoothquant: dict, modules: dict, seconds: float) -> dict:
    """What a quantize run records, whole or block by block: the recipe with its tail on this family, the evidence
    that SmoothQuant ran, the kinds of module it made, and its time."""
    tail = tail_for(recipe, family)
    return {"recipe": {**asdict(recipe), "tail": tail}, "smoothquant": smoothquant, "modules": modules,
            "seconds": round(seconds, 1)}  # fmt: skip


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of a tied embedding matrix; returns whether it was tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = nn.Parameter(out.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def present_norms_to_inc(model: nn.Module) -> dict[str, nn.Module]:
    """Show INC the family's norms in a form it folds correctly, computing the same thing: under the class it
    knows (Family.shown_as) with weight + norm_offset, and with a zero bias where a LayerNorm has none (INC
    scales a LayerNorm's bias with its weight). Returns the norms changed, as they were (see `restore_norms`)."""
    from transformers.models.llama import modeling_llama

    family, originals = family_of(model), {}
    for name, mod in model.named_modules():
        alias = family.shown_as and type(mod).__name__ == family.norm_class
        biasless = isinstance(mod, nn.LayerNorm) and mod.bias is None
        if alias or biasless:
            originals[name] = copy.deepcopy(mod)
        if alias:
            mod.variance_epsilon = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
            mod.__class__ = getattr(modeling_llama, family.shown_as)
            with torch.no_grad():
                mod.weight.add_(family.norm_offset)
        if biasless:
            mod.bias = nn.Parameter(torch.zeros_like(mod.weight))
    return originals


def restore_norms(qmodel: nn.Module, originals: dict[str, nn.Module], offset: float) -> None:
    """Put each norm shown to INC back as it was, with INC's folded weight (minus norm_offset). INC may have
    traced it into a GraphModule; its parameters keep their names."""
    for name, norm in originals.items():
        folded = qmodel.get_submodule(name)
        with torch.no_grad():
            norm.weight.copy_(folded.weight.detach() - offset)
        parent, _, child = name.rpartition(".")
        setattr(qmodel.get_submodule(parent), child, norm)


def build_config(recipe: Recipe, family: Family, calibration_size: int, judged: bool = False):
    """INC's config for `recipe` on `family`; `judged`: a trial of accuracy-aware tuning (quantize/maintainer/tune.py),
    passing when its eval_fn's score loses nothing against the FP32 baseline's."""
    from neural_compressor.config import AccuracyCriterion, PostTrainingQuantConfig, TuningCriterion

    recipes = {}
    if recipe.smooth_quant:
        recipes = {
            "smooth_quant": True,
            "smooth_quant_args": {"alpha": recipe.alpha, "folding": True},
        }
    fp32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    return PostTrainingQuantConfig(
        approach="static",
        backend="default",
        recipes=recipes,
        op_name_dict={linear_regex(family, role): fp32 for role, _ in tail_for(recipe, family)} or None,
        op_type_dict={"Linear": {"activation": {"algorithm": [recipe.activation_algorithm]}}},
        calibration_sampling_size=[calibration_size],
        accuracy_criterion=AccuracyCriterion(criterion="absolute", tolerable_loss=0.0),
        # one trial per INC run (tune.py says why); 2, because with max_trials=1 a missed criterion returns no
        # model at all, where the early stop returns the one it tried
        tuning_criterion=TuningCriterion(max_trials=2 if judged else 1, timeout=0),
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# SmoothQuant pairs INC does not absorb (it only folds into a norm it finds in its trace): where the scale goes
# (a norm's weight, or a Linear's output rows) and the Linear whose input columns take it. down_proj's input is
# silu(gate) * up, o_proj's is softmax-weighted rows of v, so scaling up's or v's rows scales them exactly.
def family_pairs(
    family: Family, kinds: tuple[str, ...], layers: range | list[int], model_wide: bool = True
) -> list[tuple[str, str]]:
    """The (producer, consumer) module names of the pairs `kinds` that `family` has: the per-block ones of the
    blocks `layers`, and with `model_wide` those that occur once (final norm -> lm_head)."""
    return [
        (p.format(i=i), c.format(i=i))
        for k in kinds
        if k in family.smoothed
        for p, c in [pair(family, k)]
        for i in (layers if "{i}" in p else [0] if model_wide else [])
    ]


def smooth_pairs(
    model: nn.Module, run: Callable[[], object], pairs: list[tuple[str, str]], alpha: float
) -> dict[str, torch.Tensor]:
    """SmoothQuant's migration (Xiao et al.) for `pairs` (producer, consumer) of `model`: per input channel j of the
    consumer, s_j = max|X_j|^alpha / max|W_j|^(1-alpha), X observed while `run()` passes the calibration through
    `model`; X is divided by s where it is produced, W's column j multiplied by s. Exact in real arithmetic; the
    outlier channels a per-token INT8 scale would spend its range on shrink. Needs untied embeddings (lm_head
    scaled alone). Returns s per consumer."""
    x_max = {c: torch.zeros(model.get_submodule(c).in_features) for _, c in pairs}

    def observe(name: str):
        def hook(_module, inputs) -> None:
            x_max[name].copy_(
                torch.maximum(x_max[name], inputs[0].detach().abs().float().flatten(0, -2).amax(0))
            )

        return hook

    hooks = [model.get_submodule(c).register_forward_pre_hook(observe(c)) for _, c in pairs]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    head_dim = (
        getattr(model.config, "head_dim", None)
        or model.config.hidden_size // model.config.num_attention_heads
    )
    return {
        c: _migrate(model.get_submodule(p), model.get_submodule(c), x_max[c], alpha, head_dim)
        for p, c in pairs
    }


def pair_alpha(recipe: Recipe) -> float:
    return recipe.pair_alpha or (float(recipe.alpha) if recipe.alpha != "auto" else 0.5)


def _migrate(
    producer: nn.Module,
    consumer: nn.Linear,
    x_max: torch.Tensor,
    alpha: float,
    head_dim: int,
) -> torch.Tensor:
    """Divide the producer's output channel r by s_r and multiply the consumer's matching input columns by it.
    With GQA, o_proj has more input channels than v_proj has rows: each v row feeds `repeat` query heads' columns,
    which then share one scale (computed over all of them)."""
    rows = producer.weight.shape[0]
    repeat = consumer.in_features // rows
    w_max = consumer.weight.detach().abs().float().amax(0)
    c = torch.arange(
        consumer.in_features
    )  # consumer channel c = (kv * repeat + g) * D + d feeds from kv * D + d
    index = c // head_dim // repeat * head_dim + c % head_dim
    x_row = torch.zeros(rows).scatter_reduce(0, index, x_max, "amax")
    w_row = torch.zeros(rows).scatter_reduce(0, index, w_max, "amax")
    s = (x_row.clamp(min=1e-5) ** alpha / w_row.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    with torch.no_grad():
        producer.weight.div_((s[:, None] if producer.weight.dim() == 2 else s).to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        consumer.weight.mul_(s[index].to(consumer.weight.dtype)[None, :])
    return s


def quantize(
    model: nn.Module,
    calibration: list[torch.Tensor],
    recipe: Recipe,
    workdir: Path,
    judge: Callable[[nn.Module], float] | None = None,
) -> QuantizeResult:
    """Quantize a copy of `model` (any float dtype) with `recipe`, calibrating on token-id tensors [1, T];
    `judge`, INC's eval_fn, makes it a trial of accuracy-aware tuning (quantize/maintainer/tune.py).

    INCQuantizer writes its own files into `workdir`; the caller saves the final folder with `save_int8`.
    """
    start = time.perf_counter()
    model = copy.deepcopy(model).float().eval()
    untie_embeddings(model)  # lm_head is scaled alone
    pairs = family_pairs(family_of(model), recipe.smooth_pairs, range(model.config.num_hidden_layers))
    run = (lambda: [model(input_ids=ids) for ids in calibration]) if recipe.smooth_pairs else None
    models.outputs_for(model.config, models.FOR_TRACING)
    ids = [x[0].tolist() for x in calibration]
    columns = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
    qmodel, q_config, evidence, log_lines = quantize_part(model, columns, run, pairs, recipe, workdir, judge)
    models.outputs_for(qmodel.config, models.FOR_LOADERS)  # INC's trace is done
    seconds = time.perf_counter() - start
    met = criterion_met(log_lines) if judge is not None else None
    return QuantizeResult(
        qmodel, q_config, recipe, evidence, module_counts(qmodel), seconds, Path(workdir), met
    )


def quantize_part(
    part: nn.Module,
    columns: dict[str, list],
    run: Callable[[], object] | None,
    pairs: list[tuple[str, str]],
    recipe: Recipe,
    workdir: Path,
    judge: Callable[[nn.Module], float] | None = None,
) -> tuple[nn.Module, dict, dict, list[str]]:
    """The recipe on an FP32 part of a model, in place: the whole model, or one decoder block (maintainer/blockwise.py).
    Its norms shown to INC, the `pairs` INC cannot absorb smoothed on what `run()` passes through it (None: nothing
    to observe), INC's SmoothQuant and INT8 calibrated on `columns` (the part's forward arguments, a sample per
    row), the norms given back and the recipe's tail. Returns the quantized part, INC's tuning config, the evidence
    that SmoothQuant ran, and INC's log."""
    family = family_of(part)
    norms_before = norm_weights(part)  # before any smoothing: folding puts the scales into the norms
    shown = present_norms_to_inc(part)
    if run is not None:
        smooth_pairs(part, run, pairs, pair_alpha(recipe))
    config = build_config(recipe, family, len(next(iter(columns.values()))), judge is not None)
    qmodel, log_lines = run_inc(part, columns, config, workdir, judge)
    # mmap: only INC's tuning config is read, not the INT8 state dict saved next to it
    q_config = torch.load(
        Path(workdir) / "pytorch_model.bin", map_location="cpu", weights_only=False, mmap=True
    )["best_configure"]
    restore_norms(qmodel, shown, family.norm_offset)
    apply_tail(qmodel, q_config, recipe, family)
    evidence = smoothquant_evidence(log_lines, norms_before, qmodel) if recipe.smooth_quant else {}
    return qmodel, q_config, evidence, log_lines


def run_inc(
    model: nn.Module, columns: dict[str, list], config, workdir: Path, judge
) -> tuple[nn.Module, list[str]]:
    """INCQuantizer on the prepared FP32 model (a whole model, or one block: quantize/maintainer/blockwise.py), calibrated on
    `columns` (its forward's arguments, one sample per row): the quantized model, and what INC logged meanwhile."""
    import datasets
    from neural_compressor.config import options
    from optimum.intel import INCQuantizer

    ds = datasets.Dataset.from_dict(columns)
    options.workspace = str(Path(workdir) / "nc_workspace")  # INC writes its history here, not into the CWD
    capture = _Capture()
    inc_log = logging.getLogger("neural_compressor")
    inc_log.addHandler(capture)
    try:
        quantizer = INCQuantizer.from_pretrained(model, task="text-generation", eval_fn=judge)
        if judge is None:
            # optimum stands `lambda model: 1` in for a missing eval_fn, and any eval_fn makes INC tune: it quantizes
            # a deep copy of the FP32 model. Without one INC quantizes in place (performance_only): one copy less.
            quantizer.eval_fn = None
        quantizer.quantize(
            quantization_config=config,
            calibration_dataset=ds,
            batch_size=1,  # no padding: every calibration sample keeps its own length
            save_directory=workdir,
        )
    finally:
        inc_log.removeHandler(capture)
        release_inc_leftovers()
    return drop_borrowed_methods(quantizer._quantized_model), capture.lines


def release_inc_leftovers() -> None:
    """Free the FP32 copies INC's run leaves in torch's process-wide state, which gc cannot reach:
    - torch caches `assert_and_get_unique_device` on every module it is given (functools.cache), so each FX
      GraphModule INC builds lives on with its own FP32 weights;
    - SmoothQuant's graph trace (torch.jit.trace + freeze) leaves the frozen graph, the weights inlined as constants,
      in TorchScript's global compilation unit (pytorch#96726). Cleared the way torch's own JIT tests reset it;
      nothing in Q8-Chat keeps a TorchScript module across an INC run.
    Without this a quantize process grows by two FP32 copies of the model per INC run."""
    from torch.ao.quantization.fx.utils import assert_and_get_unique_device

    assert_and_get_unique_device.cache_clear()
    torch._C._jit_clear_class_registry()
    torch.jit._recursive.concrete_type_store = torch.jit._recursive.ConcreteTypeStore()
    torch.jit._state._clear_class_state()


def drop_borrowed_methods(qmodel: nn.Module) -> nn.Module:
    """INC copies every attribute of an FP32 module onto the FX module that replaces it (`append_attr`), bound methods
    such as `reset_parameters` included: each keeps its FP32 original, weights and all, alive inside the INT8 model."""
    for module in qmodel.modules():
        for name, value in list(vars(module).items()):
            if (
                isinstance(value, types.MethodType)
                and isinstance(value.__self__, nn.Module)
                and value.__self__ is not module
            ):
                delattr(module, name)
    return qmodel


def criterion_met(log_lines: list[str]) -> bool:
    """INC's verdict on its trial, from its own line "Tune 1 result is: [...], Best tune result is: [...]": the
    best stays "n/a" until a trial meets the AccuracyCriterion. (fit() also returns a trial that missed it when
    SmoothQuant's early stop ends tuning, and then logs that it found one that meets it.)"""
    verdicts = [ln.rpartition("Best tune result is:")[2] for ln in log_lines if "Best tune result is:" in ln]
    return bool(verdicts) and "n/a" not in verdicts[-1]


def quantize_to_folder(
    bf16: nn.Module,
    tokenizer,
    calibration: list[torch.Tensor],
    recipe: Recipe,
    out: Path,
) -> QuantizeResult:
    """The one way an INT8 folder is made (the maintainer command, the bench's config model, the frontier):
    quantize, prove SmoothQuant ran when the recipe asks for it, and save the folder at `out`."""
    work = Path(out).with_name(Path(out).name + ".inc-work")
    try:
        result = quantize(bf16, calibration, recipe, work)
        check_smoothquant(result)
        save_int8(result, out, tokenizer, bf16)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def check_smoothquant(result: QuantizeResult) -> None:
    require_smoothquant(result.recipe, result.smoothquant)


def require_smoothquant(recipe: Recipe, evidence: dict) -> None:
    """Never ship plain PTQ under SmoothQuant's name: a recipe that asks for it must show it was applied."""

    if recipe.smooth_quant and not evidence.get("applied"):
        said = " ".join(evidence.get("inc_log") or []) or "nothing"
        raise ModelError(f"SmoothQuant was not applied to this model (Neural Compressor said: {said}).")


def save_int8(result: QuantizeResult, out: Path, tokenizer, original: nn.Module) -> None:
    """Write the folder INCModelForCausalLM.from_pretrained loads: INC's config files, the state dict with INC's
    tuning config (now holding the dynamic ops too), and the tokenizer and generation config INC does not save;
    plus engine.safetensors, the same INT8 tensors for the engine (no pickle), when the engine can run them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in result.workdir.iterdir():
        if f.is_file() and f.name != "pytorch_model.bin":
            shutil.copy2(f, out / f.name)
    state = result.model.state_dict()
    state["best_configure"] = result.q_config
    torch.save(state, out / "pytorch_model.bin")
    engine_file.write_engine_file(result.model, out)
    config = json.loads((out / "config.json").read_text())
    write_loader_files(out, config, tokenizer, getattr(original, "generation_config", None))


def write_loader_files(out: Path, config: dict, tokenizer, generation_config) -> None:
    """What every INT8 folder holds beside its weights, whichever path built it: the config as a loader wants it
    (dict outputs and a KV cache, not INC's trace's settings; lm_head untied, as it was quantized), the tokenizer
    and the generation config."""
    config = config | models.FOR_LOADERS | {"tie_word_embeddings": False}
    files.write_file(Path(out) / "config.json", json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)


def norm_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every norm's weight (LayerNorm, *RMSNorm), by parameter name: where folding puts the scales."""
    return {
        f"{name}.weight": mod.weight.detach().clone()
        for name, mod in model.named_modules()
        if type(mod).__name__.endswith("Norm") and getattr(mod, "weight", None) is not None
    }


def smoothquant_evidence(
    log_lines: list[str], norms_before: dict[str, torch.Tensor], qmodel: nn.Module
) -> dict:
    """INC's own words plus the weights themselves: folded scales change the RMSNorm weights."""
    absorbed = [ln for ln in log_lines if "could be absorbed" in ln]
    skipped = [
        ln for ln in log_lines if "smooth quant is skipped" in ln.lower() or "skip smooth" in ln.lower()
    ]
    after = dict(qmodel.named_parameters())
    changed = [
        n for n, w in norms_before.items() if n in after and not torch.allclose(after[n].float(), w.float())
    ]
    m = re.search(r"(\d+) out of (\d+) layers could be absorbed", " ".join(absorbed))
    return {
        "applied": bool(absorbed) and not skipped and bool(changed),
        "inc_log": absorbed[:1] + skipped[:1],
        "absorbed_layers": int(m.group(1)) if m else 0,
        "candidate_layers": int(m.group(2)) if m else 0,
        "norms_rescaled": len(changed),
        "norms_total": len(norms_before),
    }


def apply_tail(qmodel: nn.Module, q_config: dict, recipe: Recipe, family: Family) -> None:
    for role, mode in tail_for(recipe, family):
        if mode == "dynamic":
            make_dynamic(qmodel, q_config, (linear_regex(family, role),))
        elif mode == "bf16":
            make_bf16(qmodel, q_config, (linear_regex(family, role),))


def _tail_modules(qmodel: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the plain (FP32) Linears INC left out of static INT8 that match `patterns`."""
    regex = [re.compile(p) for p in patterns]
    return [
        name
        for name, mod in qmodel.named_modules()
        if type(mod) is nn.Linear and any(r.fullmatch(name) or r.fullmatch(name + ".module") for r in regex)
    ]


def _op_keys(q_config: dict, names: list[str]) -> list[tuple[str, str]]:
    """INC's op keys for module names; INC names some ops "<name>.module" (its wrapper's child)."""
    bare = {n.removesuffix(".module") for n in names}
    return [key for key in q_config["op"] if key[0].removesuffix(".module") in bare]


def _set_op_config(q_config: dict, names: list[str], cfg: dict) -> None:
    for key in _op_keys(q_config, names):
        q_config["op"][key] = copy.deepcopy(cfg)


def make_dynamic(qmodel: nn.Module, q_config: dict, patterns: tuple[str, ...]) -> list[str]:
    """Turn the FP32 Linears INC kept out of static INT8 into FBGEMM dynamic INT8, in the model and in INC's
    tuning config (quant_mode "dynamic"), so INC's loader rebuilds exactly this graph."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    names = _tail_modules(qmodel, patterns)
    for name in names:
        mod = qmodel.get_submodule(name)
        mod.qconfig = per_channel_dynamic_qconfig
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        setattr(parent, child, DynamicLinear.from_float(mod))
        if isinstance(parent, torch.fx.GraphModule):
            # INC copied the FP32 Linear's weight/bias onto its graph wrapper; INC's loader does not, so the
            # stale aliases would be "unexpected keys" when the folder is loaded.
            for attr in ("weight", "bias"):
                parent.__dict__.get("_parameters", {}).pop(attr, None)
                parent.__dict__.pop(attr, None)
    _set_op_config(
        q_config,
        names,
        {
            "weight": {
                "dtype": "int8",
                "scheme": "sym",
                "granularity": "per_channel",
                "algorithm": "minmax",
            },
            "activation": {
                "dtype": "uint8",
                "scheme": "asym",
                "granularity": "per_tensor",
                "algorithm": "placeholder",
                "quant_mode": "dynamic",
            },
        },
    )
    return names


def make_bf16(qmodel: nn.Module, q_config: dict, patterns: tuple[str, ...]) -> list[str]:
    """Run the matching FP32 Linears in BF16 through INC's own BF16 wrapper, listed in the tuning config's
    bf16_ops_list so INC's loader wraps them the same way."""
    from neural_compressor.adaptor.torch_utils.bf16_convert import Convert

    names = _tail_modules(qmodel, patterns)
    _set_op_config(q_config, names, {"weight": {"dtype": "bf16"}, "activation": {"dtype": "bf16"}})
    # bare names: INC's Convert wraps "x" for both "x" and "x.module", and would wrap a GraphModule twice
    ops = [(name.removesuffix(".module"), kind) for name, kind in _op_keys(q_config, names)]
    q_config["bf16_ops_list"] = list(q_config.get("bf16_ops_list") or []) + ops
    Convert(qmodel, {"bf16_ops_list": ops})
    return names


def module_counts(model: nn.Module) -> dict[str, int]:
    """How many Linear-like modules of each kind: the proof that INT8 kernels (not fake quant) run."""
    counts: dict[str, int] = {}
    for mod in model.modules():
        kind = f"{type(mod).__module__}.{type(mod).__name__}"
        if "Linear" in kind or "Embedding" in kind or "QDQ" in kind or "FakeQuant" in kind:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
