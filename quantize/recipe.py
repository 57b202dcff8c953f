"""The quantization recipe: Neural Compressor's SmoothQuant, through Optimum Intel's INCQuantizer.

What the documented recipe gives, and why this one differs (../shared/docs/stack-notes.md, re-checked here):
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
    SmoothQuant's scaling to that pair itself before INC runs (`smooth_lm_head`). With it lm_head can be dynamic
    INT8 within the quality bar; in BF16 its 49152x576 GEMV alone was ~4 ms of a ~30 ms INT8 token.
`python -m quantize.frontier` measures every variant below; DEFAULT_RECIPE is the fastest one that meets the
quality bar on the real default model.
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
# Ops with no norm in front of them, so SmoothQuant cannot fold a scale for them (INC: "150 out of 211").
O_PROJ, DOWN_PROJ, LM_HEAD = r".*o_proj(\.module)?", r".*down_proj(\.module)?", r"lm_head(\.module)?"
TAIL_MODES = ("fp32", "dynamic", "bf16")


@dataclass(frozen=True)
class Recipe:
    """One point of the quality/speed frontier."""

    name: str
    smooth_quant: bool = True
    alpha: float | str = 0.5  # SmoothQuant migration strength, or "auto" (INC searches per layer)
    # op-name regex -> what it runs instead of static INT8: "fp32", "dynamic" (FBGEMM INT8, scale per call) or
    # "bf16" (INC's BF16 wrapper)
    tail: tuple[tuple[str, str], ...] = ()
    # INC's default for Linear activations is KL calibration, which clips the outliers LLMs depend on.
    activation_algorithm: str = "minmax"
    # SmoothQuant for lm_head, which INC cannot absorb (it finds no norm in front of it in its trace), done here
    # the same way before INC runs: the final RMSNorm's output channels scaled down, lm_head's columns up.
    smooth_lm_head: bool = False
    description: str = ""

    @property
    def excluded(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.tail)


QKV, GATE_UP = r".*[qkv]_proj(\.module)?", r".*(gate|up)_proj(\.module)?"


def _tail(o: str, d: str, lm: str, qkv_gu: str | None = None) -> tuple[tuple[str, str], ...]:
    head = ((QKV, qkv_gu), (GATE_UP, qkv_gu)) if qkv_gu else ()
    return head + ((O_PROJ, o), (DOWN_PROJ, d), (LM_HEAD, lm))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("sq-static-all-kl", activation_algorithm="kl",
               description="SmoothQuant + static INT8 everywhere, INC's default KL calibration (the documented "
                           "recipe, made real with folding)"),
        Recipe("sq-static-all", description="as sq-static-all-kl with minmax calibration"),
        Recipe("static-no-sq", smooth_quant=False, description="static INT8 everywhere, no SmoothQuant"),
        Recipe("sq-fp32-tail", tail=_tail("fp32", "fp32", "fp32"),
               description="SmoothQuant static INT8; o_proj, down_proj, lm_head kept FP32 (the obvious repair)"),
        Recipe("sq-bf16-tail", tail=_tail("bf16", "bf16", "bf16"),
               description="SmoothQuant static INT8; o_proj, down_proj, lm_head in BF16"),
        Recipe("sq-dynamic-all", tail=_tail("dynamic", "dynamic", "dynamic", qkv_gu="dynamic"),
               description="SmoothQuant folded, every Linear dynamic INT8"),
        Recipe("sq-dynamic", tail=_tail("dynamic", "bf16", "bf16", qkv_gu="dynamic"),
               description="SmoothQuant folded; q/k/v/o/gate/up dynamic INT8 (activation scale per token in "
                           "decode); down_proj and lm_head BF16"),
        Recipe("sq-dynamic-lm", tail=_tail("dynamic", "bf16", "dynamic", qkv_gu="dynamic"),
               description="as sq-dynamic with lm_head dynamic INT8 too (BF16 GEMV of the 49152x576 lm_head is "
                           "~4 ms of a token here); only down_proj BF16"),
        Recipe("sq-dynamic-lm-smooth", tail=_tail("dynamic", "bf16", "dynamic", qkv_gu="dynamic"),
               smooth_lm_head=True,
               description="as sq-dynamic-lm, with SmoothQuant's scaling applied to lm_head too (INC does not "
                           "absorb it)"),
        Recipe("no-sq-dynamic", smooth_quant=False, tail=_tail("dynamic", "bf16", "bf16", qkv_gu="dynamic"),
               description="as sq-dynamic without SmoothQuant (shows what smoothing buys)"),
    ]
}
DEFAULT_RECIPE = "sq-dynamic-lm-smooth"
BASELINE_NO_SQ = "no-sq-dynamic"


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
        calibration_sampling_size=[calibration_size],
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def smooth_lm_head(model: nn.Module, calibration: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's migration (Xiao et al.) for lm_head: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input
    channel j, X divided by s inside the final RMSNorm's weight and W's column j multiplied by s. The product is
    unchanged in exact arithmetic; the outlier channels of the last hidden state, which a per-token INT8 scale
    otherwise spends its range on, shrink. Needs untied embeddings (lm_head scaled alone). Returns s."""
    norm, head = model.model.norm, model.lm_head
    x_max = torch.zeros(head.in_features)

    def observe(_module, _inputs, out: torch.Tensor) -> None:
        x_max.copy_(torch.maximum(x_max, out.detach().abs().float().amax(dim=(0, 1))))

    hook = norm.register_forward_hook(observe)
    try:
        with torch.inference_mode():
            for ids in calibration:
                model(input_ids=ids)
    finally:
        hook.remove()
    w_max = head.weight.detach().abs().float().amax(dim=0)
    s = (x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    with torch.no_grad():
        norm.weight.div_(s.to(norm.weight.dtype))
        head.weight.mul_(s.to(head.weight.dtype)[None, :])
    return s


def quantize(model: nn.Module, calibration: list[torch.Tensor], recipe: Recipe, workdir: Path) -> QuantizeResult:
    """Quantize a copy of `model` (any float dtype) with `recipe`, calibrating on token-id tensors [1, T].

    INCQuantizer writes its own files into `workdir`; the caller saves the final folder with `save_int8`.
    """
    import datasets
    from optimum.intel import INCQuantizer

    start = time.perf_counter()
    model = copy.deepcopy(model).float().eval()
    untie_embeddings(model)
    if recipe.smooth_lm_head:
        smooth_lm_head(model, calibration, float(recipe.alpha) if recipe.alpha != "auto" else 0.5)
    model.config.return_dict = False  # INC's jit trace for SmoothQuant needs tuple outputs
    norms_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("norm.weight")}

    ds = datasets.Dataset.from_dict({
        "input_ids": [ids[0].tolist() for ids in calibration],
        "attention_mask": [[1] * ids.shape[1] for ids in calibration],
    })
    from neural_compressor.config import options

    options.workspace = str(Path(workdir) / "nc_workspace")  # INC writes its history here, not into the CWD
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
    qmodel.config.return_dict = True  # back to normal outputs now that INC's trace is done
    q_config = torch.load(Path(workdir) / "pytorch_model.bin", map_location="cpu", weights_only=False)["best_configure"]

    apply_tail(qmodel, q_config, recipe)

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


def apply_tail(qmodel: nn.Module, q_config: dict, recipe: Recipe) -> None:
    for pattern, mode in recipe.tail:
        if mode == "dynamic":
            make_dynamic(qmodel, q_config, (pattern,))
        elif mode == "bf16":
            make_bf16(qmodel, q_config, (pattern,))


def _tail_modules(qmodel: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the plain (FP32) Linears INC left out of static INT8 that match `patterns`."""
    regex = [re.compile(p) for p in patterns]
    return [name for name, mod in qmodel.named_modules()
            if type(mod) is nn.Linear and any(r.fullmatch(name) or r.fullmatch(name + ".module") for r in regex)]


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
    _set_op_config(q_config, names, {
        "weight": {"dtype": "int8", "scheme": "sym", "granularity": "per_channel", "algorithm": "minmax"},
        "activation": {"dtype": "uint8", "scheme": "asym", "granularity": "per_tensor", "algorithm": "placeholder",
                       "quant_mode": "dynamic"},
    })
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


STATIC_INT8 = "torch.ao.nn.quantized.modules.linear.Linear"
DYNAMIC_INT8 = "torch.ao.nn.quantized.dynamic.modules.linear.Linear"
FAKE_QUANT_MARKERS = ("QDQ", "FakeQuant", "SQLinearWrapper")
