"""The quantization recipe: Neural Compressor's SmoothQuant, through Optimum Intel's INCQuantizer.

What the documented recipe gives, and why this one differs (see ../shared/docs/stack-notes.md, re-checked here):
  * `folding=True` is set explicitly: the default (`folding=False`) takes INC's QDQ path, which is fake
    quantization (FP32 weights and GEMMs wrapped in quantize/dequantize).
  * `config.return_dict=False` while quantizing: otherwise INC's jit trace fails and SmoothQuant is silently
    skipped. We prove it ran by reading INC's own "N out of M layers could be absorbed" line and by checking that
    the RMSNorm weights actually changed (that is where folding puts the smoothing scales).
  * Tied embeddings are untied first: INC scales lm_head in place, which would also scale the input embeddings.
  * Layers that cannot absorb a smoothing scale (o_proj, down_proj, lm_head: no norm in front of them) carry the
    activation outliers that wreck per-tensor static INT8 on real weights. INC keeps them out of static INT8
    (`op_name_dict`), and we then give them INC's *dynamic* INT8 quant mode (FBGEMM, an activation scale per call,
    i.e. per token in decode) instead of leaving them in FP32 — written into INC's own tuning config, so
    `INCModelForCausalLM.from_pretrained` rebuilds the same mixed static/dynamic graph.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("q8chat")

SUPPORTED_MODEL_TYPES = {"llama"}  # INC's absorb detection and this recipe are verified on Llama blocks only
NON_ABSORBABLE = (r".*o_proj(\.module)?", r".*down_proj(\.module)?", r"lm_head(\.module)?")


@dataclass(frozen=True)
class Recipe:
    """One point of the quality/speed frontier."""

    name: str
    smooth_quant: bool = True
    alpha: float | str = 0.5  # SmoothQuant migration strength, or "auto" (INC searches per layer)
    excluded: tuple[str, ...] = ()  # op-name regexes kept out of static INT8
    excluded_mode: str = "dynamic"  # what excluded ops become: "dynamic" INT8 or "fp32"
    # INC's default for Linear activations is KL calibration, which clips the outliers LLMs depend on.
    activation_algorithm: str = "minmax"
    # 7-bit activations: without VNNI, FBGEMM's u8*s8 multiply-add (vpmaddubsw) saturates int16 at full range.
    reduce_range: bool = True
    description: str = ""


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("sq-static-all", description="SmoothQuant + static INT8 everywhere (the recipe as documented, "
                                            "made real with folding)"),
        Recipe("static-no-sq", smooth_quant=False, description="static INT8 everywhere, no SmoothQuant"),
        Recipe("sq-fp32-tail", excluded=NON_ABSORBABLE, excluded_mode="fp32",
               description="SmoothQuant static INT8; o_proj, down_proj, lm_head kept FP32 (the obvious repair)"),
        Recipe("sq-dynamic-tail", excluded=NON_ABSORBABLE, excluded_mode="dynamic",
               description="SmoothQuant static INT8 for q/k/v/gate/up; o_proj, down_proj, lm_head dynamic INT8"),
        Recipe("no-sq-dynamic-tail", smooth_quant=False, excluded=NON_ABSORBABLE, excluded_mode="dynamic",
               description="as sq-dynamic-tail but without SmoothQuant (shows what smoothing buys)"),
    ]
}
DEFAULT_RECIPE = "sq-dynamic-tail"
BASELINE_NO_SQ = "no-sq-dynamic-tail"


@dataclass
class QuantizeResult:
    model: nn.Module  # the quantized transformers model (INT8 modules inside)
    q_config: dict  # INC's tuning config, as saved in pytorch_model.bin["best_configure"]
    recipe: Recipe
    smoothquant: dict = field(default_factory=dict)  # proof that smoothing was applied
    modules: dict = field(default_factory=dict)  # counts of module types after quantization
    seconds: float = 0.0
    workdir: Path | None = None  # where INCQuantizer wrote config.json, inc_config.json, pytorch_model.bin

    def summary(self) -> dict:
        return {"recipe": asdict(self.recipe), "smoothquant": self.smoothquant, "modules": self.modules,
                "seconds": round(self.seconds, 1)}


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of a tied embedding matrix; returns whether it was tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = nn.Parameter(out.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def build_config(recipe: Recipe, calibration_size: int):
    from neural_compressor.config import PostTrainingQuantConfig

    recipes = {}
    if recipe.smooth_quant:
        recipes = {"smooth_quant": True, "smooth_quant_args": {"alpha": recipe.alpha, "folding": True}}
    fp32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    return PostTrainingQuantConfig(
        approach="static",
        backend="default",
        recipes=recipes,
        op_name_dict={pattern: fp32 for pattern in recipe.excluded} or None,
        op_type_dict={"Linear": {"activation": {"algorithm": [recipe.activation_algorithm]}}},
        reduce_range=recipe.reduce_range,
        calibration_sampling_size=[calibration_size],
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def quantize(model: nn.Module, calibration: list[torch.Tensor], recipe: Recipe, workdir: Path) -> QuantizeResult:
    """Quantize a copy of `model` (any float dtype) with `recipe`, calibrating on token-id tensors [1, T].

    INCQuantizer writes its own files into `workdir`; the caller saves the final folder with `save_int8`.
    """
    import datasets
    from optimum.intel import INCQuantizer

    start = time.perf_counter()
    model = copy.deepcopy(model).float().eval()
    untie_embeddings(model)
    model.config.return_dict = False  # INC's jit trace for SmoothQuant needs tuple outputs
    norms_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("norm.weight")}

    ds = datasets.Dataset.from_dict({
        "input_ids": [ids[0].tolist() for ids in calibration],
        "attention_mask": [[1] * ids.shape[1] for ids in calibration],
    })
    capture = _Capture()
    inc_log = logging.getLogger("neural_compressor")
    inc_log.addHandler(capture)
    try:
        quantizer = INCQuantizer.from_pretrained(model, task="text-generation")
        quantizer.quantize(
            quantization_config=build_config(recipe, len(ds)),
            calibration_dataset=ds,
            batch_size=1,  # no padding: every calibration sample keeps its own length
            save_directory=workdir,
        )
    finally:
        inc_log.removeHandler(capture)
    qmodel = quantizer._quantized_model
    q_config = torch.load(Path(workdir) / "pytorch_model.bin", map_location="cpu", weights_only=False)["best_configure"]

    if recipe.excluded and recipe.excluded_mode == "dynamic":
        make_dynamic(qmodel, q_config, recipe.excluded)

    result = QuantizeResult(model=qmodel, q_config=q_config, recipe=recipe, seconds=time.perf_counter() - start,
                            workdir=Path(workdir))
    result.smoothquant = smoothquant_evidence(capture.lines, norms_before, qmodel) if recipe.smooth_quant else {}
    result.modules = module_counts(qmodel)
    return result


def save_int8(result: QuantizeResult, out: Path, tokenizer, original: nn.Module) -> None:
    """Write the folder INCModelForCausalLM.from_pretrained loads: INC's config files, the state dict with INC's
    tuning config (now holding the dynamic ops too), and the tokenizer and generation config INC does not save."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in result.workdir.iterdir():
        if f.is_file() and f.name != "pytorch_model.bin":
            shutil.copy2(f, out / f.name)
    state = result.model.state_dict()
    state["best_configure"] = result.q_config
    torch.save(state, out / "pytorch_model.bin")
    config = json.loads((out / "config.json").read_text())
    # INC's trace needed tuple outputs; whoever loads this folder wants normal ones and a KV cache.
    config.update(return_dict=True, use_cache=True, tie_word_embeddings=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    if getattr(original, "generation_config", None) is not None:
        original.generation_config.save_pretrained(out)


def smoothquant_evidence(log_lines: list[str], norms_before: dict[str, torch.Tensor], qmodel: nn.Module) -> dict:
    """INC's own words plus the weights themselves: folded scales change the RMSNorm weights."""
    absorbed = [ln for ln in log_lines if "could be absorbed" in ln]
    skipped = [ln for ln in log_lines if "smooth quant is skipped" in ln.lower() or "skip smooth" in ln.lower()]
    after = dict(qmodel.named_parameters())
    changed = [n for n, w in norms_before.items() if n in after and not torch.allclose(after[n].float(), w.float())]
    m = re.search(r"(\d+) out of (\d+) layers could be absorbed", " ".join(absorbed))
    return {
        "applied": bool(absorbed) and not skipped and bool(changed),
        "inc_log": absorbed[:1] + skipped[:1],
        "absorbed_layers": int(m.group(1)) if m else 0,
        "candidate_layers": int(m.group(2)) if m else 0,
        "norms_rescaled": len(changed),
        "norms_total": len(norms_before),
    }


def make_dynamic(qmodel: nn.Module, q_config: dict, patterns: tuple[str, ...]) -> list[str]:
    """Turn the FP32 Linears INC kept out of static INT8 into FBGEMM dynamic INT8, in the model and in INC's
    tuning config (quant_mode "dynamic"), so INC's loader rebuilds exactly this graph."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    regex = [re.compile(p) for p in patterns]
    changed = []
    for name, mod in list(qmodel.named_modules()):
        if type(mod) is nn.Linear and any(r.fullmatch(name) or r.fullmatch(name + ".module") for r in regex):
            mod.qconfig = per_channel_dynamic_qconfig
            parent_name, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, child, DynamicLinear.from_float(mod))
            changed.append(name)
    dynamic_cfg = {
        "weight": {"dtype": "int8", "scheme": "sym", "granularity": "per_channel", "algorithm": "minmax"},
        "activation": {"dtype": "uint8", "scheme": "asym", "granularity": "per_tensor", "algorithm": "placeholder",
                       "quant_mode": "dynamic"},
    }
    for key in list(q_config["op"]):
        if key[0].removesuffix(".module") in changed:
            q_config["op"][key] = copy.deepcopy(dynamic_cfg)
    return changed


def module_counts(model: nn.Module) -> dict[str, int]:
    """How many Linear-like modules of each kind: the proof that INT8 kernels (not fake quant) run."""
    counts: dict[str, int] = {}
    for mod in model.modules():
        kind = f"{type(mod).__module__}.{type(mod).__name__}"
        if "Linear" in kind or "Embedding" in kind or "QDQ" in kind or "FakeQuant" in kind:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


STATIC_INT8 = "torch.ao.nn.quantized.modules.linear.Linear"
DYNAMIC_INT8 = "torch.ao.nn.quantized.dynamic.modules.linear.Linear"
FAKE_QUANT_MARKERS = ("QDQ", "FakeQuant", "SQLinearWrapper")
