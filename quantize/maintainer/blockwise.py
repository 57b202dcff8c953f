"""Block-by-block quantization: the model is never whole in FP32, so a 7B model quantizes on a 24 GB machine.

The BF16 folder's safetensors are memory-mapped and read one decoder block at a time into a skeleton built on the
meta device (accelerate's init_empty_weights). The calibration chats go through the embedding once; what reaches
the first block (its hidden states and the mask and positions the model gives every block) is captured, and from
there each block in turn:
  1. runs in FP32 on its inputs, observing what the recipe's extra pairs need (up_proj->down_proj, v_proj->o_proj)
     and giving the next block's inputs;
  2. gets the recipe's own SmoothQuant migration for those pairs (recipe.smooth_pairs);
  3. goes through Neural Compressor's SmoothQuant and quantization (recipe.run_inc: INCQuantizer on the block,
     calibrated on its captured inputs), which absorbs the norm->q/k/v and norm->gate/up scales;
  4. gets the recipe's tail (recipe.apply_tail: dynamic INT8 or BF16) and is written as safetensors; then freed.
The block sits in a module under the name it has in the whole model (model.layers.7), so INC's op names, the pairs
and the tensors written are the whole model's. The final norm -> lm_head pair and the embedding (weight-only INT8,
as INC stores it) are done last. Blocks are recorded as they finish: a rerun of the same command goes on from the
last finished block. The result is the engine's format (engine.safetensors, sharded when large); INC's loader needs
a folder built from the whole model, so none is written here (see README).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from quantize import engine_file, families, files, machine, models
from quantize.errors import ModelError
from quantize.families import Family
from quantize.maintainer import recipe

SHARD_BYTES = (
    2 * 2**30
)  # engine.safetensors is split into shards of at most this (a few GB, as the Hub likes)
FP32 = 4


# Below this many parameters INC's whole-model path fits any machine here and is faster: INC's fixed cost per run
# (trace, FX, calibration) paid once per block made the 30 thin blocks of the default model take about 30 s each,
# against about 4 minutes for the whole model in one run.
WHOLE_MODEL_MAX_PARAMS = 1_000_000_000
# What INC's whole-model path holds: 18.4 GB was measured at 1.46B parameters (issue #18's run), about 12 bytes per
# parameter (FP32 model, INC's trace and its INT8 copy) plus torch and INC themselves.
WHOLE_MODEL_BYTES_PER_PARAM, WHOLE_MODEL_FIXED_BYTES = 12, 1_100_000_000


def why_not_by_block(model_type: str, rec: recipe.Recipe) -> str | None:
    """Why the block path cannot build this family with this recipe (it writes the engine's format alone), or
    None when it can."""
    family = families.FAMILIES.get(model_type)
    if family is None:
        return f"quantize/families.py has no family {model_type!r}"
    tail = dict(recipe.tail_for(rec, family))
    if not all(tail.get(role) for role in families.ROLES):
        return f"recipe {rec.name} leaves static INT8 Linears, which the engine (and so the block path) does not run"
    return None


def parameters(source_dir: Path) -> int:
    where = engine_file.Tensors(engine_file.safetensors_files(Path(source_dir))).where
    return sum(_numel(info) for _, info, _ in where.values())


def takes(source_dir: Path, model_type: str, rec: recipe.Recipe) -> bool:
    """The models built block by block: above WHOLE_MODEL_MAX_PARAMS, of FAMILIES and a recipe the engine serves
    (every Linear dynamic INT8 or float). The others keep INC's whole-model path, whose folder INCModelForCausalLM
    loads; tests hold the two paths to the same model."""
    return why_not_by_block(model_type, rec) is None and parameters(source_dir) > WHOLE_MODEL_MAX_PARAMS


def check_whole_model_room(
    source_dir: Path, model_type: str, rec: recipe.Recipe, tune_trials: int, available_ram: int
) -> None:
    """Refuse, before the work, a model above WHOLE_MODEL_MAX_PARAMS that would be quantized whole in more memory
    than there is (the kernel would kill the run part way), saying why it is not built block by block."""

    params = parameters(source_dir)
    why = why_not_by_block(model_type, rec)
    if why is None and tune_trials > 1:
        why = (
            "the tuning search judges each trial on the whole model; --tune-trials 1 builds it block by block"
        )
    need = WHOLE_MODEL_BYTES_PER_PARAM * params + WHOLE_MODEL_FIXED_BYTES
    if params > WHOLE_MODEL_MAX_PARAMS and why is not None and need > available_ram:
        raise ModelError(f"Quantizing this {params / 1e9:.1f}B-parameter model whole needs about {need / 1e9:.0f} "
                         f"GB of memory and {available_ram / 1e9:.0f} GB are available: {why}.")  # fmt: skip


class _Captured(Exception):
    """Stops the skeleton's forward once the first block's inputs are seen (the rest of it has no weights)."""


@dataclass
class Source:
    """The BF16 model on disk: its config and its memory-mapped tensors."""

    folder: Path
    config: object  # transformers PretrainedConfig
    tensors: engine_file.Tensors

    def generation_config(self):
        """The model's generation config, None when the folder has none."""
        from transformers import GenerationConfig

        has = (self.folder / "generation_config.json").is_file()
        return GenerationConfig.from_pretrained(self.folder) if has else None

    @classmethod
    def open(cls, folder: Path) -> Source:
        from transformers import AutoConfig

        return cls(
            Path(folder),
            AutoConfig.from_pretrained(folder),
            engine_file.Tensors(engine_file.safetensors_files(folder)),
        )

    def load(
        self,
        module: nn.Module,
        prefix: str,
        fallback: dict[str, str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        """Give a meta-device module its weights from the file in `dtype` (`fallback`: a tied name to read
        instead). In the file's own dtype they stay memory-mapped: no copy is made."""
        state = {}
        for name, _ in module.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            full = full if full in self.tensors else (fallback or {}).get(full, full)
            state[name] = self.tensors.get(full).to(dtype)
        module.load_state_dict(state, strict=False, assign=True)
        return module


def skeleton(config) -> nn.Module:
    """The whole model with every weight on the meta device (no memory); buffers such as RoPE's are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    return model.eval()


def before_blocks(model: nn.Module, path: str, family: Family) -> dict[str, nn.Module]:
    """The modules with weights that run before the first block: the embedding, and OPT's learned positions."""
    ends = (path, family.final_norm, family.lm_head)
    return {name: mod for name, mod in model.named_modules()
            if name and not name.startswith(ends) and any(True for _ in mod.parameters(recurse=False))}  # fmt: skip


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks and its name (model.layers, model.decoder.layers, transformer.h)."""
    n = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ValueError("no list of decoder blocks found in this model")


class Part(nn.Module):
    """Modules of the whole model under their whole-model names (model.layers.7, lm_head), so INC's op names, the
    pairs and the tensors written are the whole model's; its `config` is the model's (INC and the recipe read it)."""

    def __init__(self, config, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.config = config
        for name, module in modules.items():
            parent: nn.Module = self
            *outer, last = name.split(".")
            for part in outer:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.ModuleDict() if part.isdigit() else nn.Module())
                parent = getattr(parent, part)
            parent.add_module(last, module)


class BlockModel(Part):
    """One decoder block called on hidden states alone: the other arguments the whole model passes its blocks
    (captured, by sequence length: mask, positions, RoPE tables) are filled in. What INC quantizes."""

    def __init__(self, config, name: str, layer: nn.Module, kwargs: dict[int, dict]) -> None:
        super().__init__(config, {name: layer})
        self.name, self.kwargs = name, kwargs

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        length = int(hidden_states.shape[1])  # a traced size is a tensor, which a dict lookup does not find
        return self.get_submodule(self.name)(hidden_states, **self.kwargs[length])[0]


def first_block_calls(
    model: nn.Module, layers: nn.ModuleList, calls: list[dict]
) -> list[tuple[torch.Tensor, dict]]:
    """What the first block receives when the model is called with each of `calls` (its keyword arguments): the
    hidden states, and the other arguments, which every block receives alike (mask, positions, RoPE tables, the
    KV cache)."""
    seen = []

    def grab(_module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        seen.append((h.detach().clone(), {k: v for k, v in kw.items() if k != "hidden_states"}))
        raise _Captured

    hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for call in calls:
                with contextlib.suppress(_Captured):
                    model(**call)
    finally:
        hook.remove()
    return seen


def capture_inputs(model: nn.Module, layers: nn.ModuleList, calibration: list[torch.Tensor]):
    """What the first block receives for each calibration sample: hidden states, and the other arguments by
    length."""
    seen = first_block_calls(model, layers, [{"input_ids": ids, "use_cache": False} for ids in calibration])
    return [h for h, _ in seen], {h.shape[1]: kw for h, kw in seen}


@dataclass
class Plan:
    """What a block-by-block run will hold and write, known before the work starts."""

    blocks: int
    block_fp32_bytes: int  # the largest block in FP32
    ends_fp32_bytes: int  # embedding + lm_head in FP32
    int8_bytes: int  # about what the INT8 folder will hold
    hidden_bytes: int  # the calibration's hidden states

    @property
    def peak_bytes(self) -> int:
        """Measured on the 1.5B and 7B shapes: INC holds about three copies of the block it quantizes (ours, its
        trace's, its capability query's); the ends are done one at a time after the blocks; plus torch itself."""
        work = max(4 * self.block_fp32_bytes, 2 * self.ends_fp32_bytes)
        return work + 4 * self.hidden_bytes + 2**30


def plan(source: Source, calibration: list[torch.Tensor]) -> Plan:
    config, where = source.config, source.tensors.where
    numel = {name: _numel(info) for name, (_, info, _) in where.items()}
    per_block = [sum(v for k, v in numel.items() if f".{i}." in k) for i in range(config.num_hidden_layers)]
    family = families.FAMILIES[config.model_type]
    tables = tuple(f"{name}." for name in (family.embed, family.positions, family.lm_head) if name)
    ends = sum(v for k, v in numel.items() if k.startswith(tables))
    if f"{family.lm_head}.weight" not in numel:  # tied: lm_head gets its own copy
        ends *= 2
    tokens = sum(ids.shape[1] for ids in calibration)
    return Plan(len(per_block), FP32 * max(per_block), FP32 * ends, sum(numel.values()) + ends // 2,
                FP32 * tokens * config.hidden_size)  # fmt: skip


def _numel(info: dict) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n


def check_room(p: Plan, out: Path, available_ram: int) -> None:
    """Refuse before hours of work: the disk must hold the blocks and the shards made from them, the memory the
    largest step."""

    probe = Path(out)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # the blocks, then the shards made from them; then beside the shards their compressed-tensors copy (export.py),
    # as large again plus its embedding and lm_head in BF16
    needed = 2 * p.int8_bytes + p.ends_fp32_bytes // 2
    if free < needed:
        raise ModelError(f"The INT8 model needs about {needed / 1e9:.1f} GB free under {probe} while it is "
                         f"written (blocks, then shards and their copy for vLLM); {free / 1e9:.1f} GB are free.")  # fmt: skip
    if available_ram < p.peak_bytes:
        raise ModelError(f"Quantizing this model block by block needs about {p.peak_bytes / 1e9:.1f} GB of "
                         f"memory; {available_ram / 1e9:.1f} GB are available.")  # fmt: skip


# ---------------------------------------------------------------- the run


@dataclass
class Progress:
    """What a run has finished, in its work folder: block files, the next block's inputs, the evidence so far."""

    work: Path

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.file = self.work / "progress.json"
        self.state = json.loads(self.file.read_text()) if self.file.is_file() else {"next": 0, "blocks": []}

    def inputs_file(self, index: int) -> Path:
        return self.work / f"inputs-{index:05d}.safetensors"

    def inputs(self, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        """The next block's inputs: the captured ones for block 0, else those the last finished block gave."""
        if not self.state["next"]:
            return captured
        saved = engine_file.Tensors([self.inputs_file(self.state["next"])])
        return [saved.get(str(i)).clone() for i in range(len(captured))]

    def finish_block(self, index: int, tensors: dict, outputs: list[torch.Tensor], summary: dict) -> None:
        """Each file under its own name, progress.json last: a kill between any two writes leaves the state of the
        block before, whose inputs are still on disk (one shared inputs file once handed a resumed block the
        inputs of the block after it)."""
        save(tensors, self.work / f"block-{index:05d}.safetensors")
        save({str(i): h.contiguous() for i, h in enumerate(outputs)}, self.inputs_file(index + 1))
        self.state["next"], self.state["blocks"] = index + 1, self.state["blocks"] + [summary]
        files.write_file(self.file, json.dumps(self.state))
        self.inputs_file(index).unlink(missing_ok=True)  # no longer anyone's inputs


def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    files.write_safetensors(
        path, {n: (lambda t=t: t) for n, t in tensors.items()}, {"format": engine_file.FORMAT}
    )


def quantize_by_block(
    source_dir: Path, calibration: list[torch.Tensor], rec: recipe.Recipe, work: Path, out: Path, tokenizer
) -> dict:
    """Quantize the BF16 folder `source_dir` with `rec`, block by block (see the module docstring), into the INT8
    folder `out`, using `work` for what a rerun resumes from. Returns what recipe.QuantizeResult.summary does."""
    from tqdm import tqdm

    start = time.perf_counter()
    source = Source.open(source_dir)
    check_room(plan(source, calibration), Path(out), machine.memory_room())
    family = families.FAMILIES[source.config.model_type]
    config = copy.deepcopy(source.config)  # the folder written keeps the source's
    models.outputs_for(config, models.FOR_TRACING)
    config.cache_implementation = None  # Gemma 2's "hybrid" cache, which use_cache=False turns off anyway
    model = skeleton(config)
    path, layers = decoder_layers(model)
    first = before_blocks(model, path, family)
    for name, mod in first.items():
        source.load(mod, name)
    captured, kwargs = capture_inputs(model, layers, calibration)
    for mod in first.values():
        mod.to("meta")  # their FP32 copies are done with
    progress = Progress(Path(work))
    hidden = progress.inputs(captured)
    del captured
    for i in tqdm(range(progress.state["next"], len(layers)), desc="blocks", unit="block", initial=progress.state["next"], total=len(layers)):  # fmt: skip
        # INC converts the block in place, and .to("meta") does not move FBGEMM's packed INT8 weights (C++
        # objects): quantizing the skeleton's own block kept every block's INT8 alive (11.3 GB at 7B). A copy of
        # the meta block is loaded instead, and goes when the block is done.
        loaded = source.load(copy.deepcopy(layers[i]), f"{path}.{i}")
        block = BlockModel(config, f"{path}.{i}", loaded, kwargs)
        tensors, hidden, summary = quantize_block(block, hidden, rec, family, i, Path(work) / "inc")
        progress.finish_block(i, tensors, hidden, summary)
        del block, loaded, tensors
        machine.malloc_trim()
    counts = quantize_ends(model, source, hidden, rec, family, Path(work) / "ends.safetensors", path)
    write_folder(source, Path(work), Path(out), tokenizer)
    parts = progress.state["blocks"] + [{"smoothquant": {}, "modules": counts}]
    return add_up(rec, family, parts, time.perf_counter() - start)


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, mod in model.named_modules() if mod is module)


def quantize_block(
    block: BlockModel,
    inputs: list[torch.Tensor],
    rec: recipe.Recipe,
    family: Family,
    index: int,
    work: Path,
) -> tuple[dict, list[torch.Tensor], dict]:
    """One block through recipe.quantize_part, as a whole model goes: its pairs smoothed, INC's SmoothQuant and
    quantization, the tail. Returns its engine tensors, its FP32 outputs (the next block's inputs) and evidence."""
    outputs: list[torch.Tensor] = []

    def run() -> None:  # observed before smoothing: its outputs are the FP32 block's
        outputs.clear()
        outputs.extend(block(h) for h in inputs)

    pairs = recipe.family_pairs(family, rec.smooth_pairs, [index], model_wide=False)
    columns = {"hidden_states": [h[0].numpy() for h in inputs]}
    qmodel, _, evidence, _ = recipe.quantize_part(block, columns, run, pairs, rec, work)
    shutil.rmtree(work, ignore_errors=True)
    tensors = engine_file.engine_tensors(qmodel)
    if tensors is None:
        raise ValueError(f"recipe {rec.name} leaves static INT8 Linears, which the engine does not run")
    return tensors, outputs, {"smoothquant": evidence, "modules": recipe.module_counts(qmodel)}


def quantize_ends(
    model: nn.Module,
    source: Source,
    hidden: list[torch.Tensor],
    rec: recipe.Recipe,
    family: Family,
    path: Path,
    layers: str,
) -> dict[str, int]:
    """lm_head (after the last block), the embedding and any other table before the blocks (OPT's positions, kept
    FP32 as INC keeps it), one at a time, saved at `path`; their module kinds."""
    head = quantize_head(model, source, hidden, rec, family)
    ends, counts = engine_file.engine_tensors(head), recipe.module_counts(head)
    model.to("meta")  # the FP32 final norm and lm_head the INT8 ones were made from
    embed_name = module_name(model, model.get_input_embeddings())
    embedding = quantize_embedding(model, source, embed_name)
    ends |= engine_file.engine_tensors(embedding)
    for name, mod in before_blocks(model, layers, family).items():
        if name != embed_name:
            ends |= {f"{name}.{n}": p.detach().float() for n, p in source.load(mod, name).named_parameters()}
    model.to("meta")
    for kind, n in recipe.module_counts(embedding).items():
        counts[kind] = counts.get(kind, 0) + n
    save(ends, path)
    return counts


def quantize_head(
    model: nn.Module, source: Source, hidden: list[torch.Tensor], rec: recipe.Recipe, family: Family
) -> dict:
    """The final norm and lm_head (its own copy when tied): the recipe's norm -> lm_head pair, then its tail."""
    norm_name, head_name = family.final_norm, family.lm_head
    tied = {f"{head_name}.weight": f"{module_name(model, model.get_input_embeddings())}.weight"}
    norm = source.load(model.get_submodule(norm_name), norm_name)
    head = source.load(model.get_output_embeddings(), head_name, fallback=tied)
    part = Part(model.config, {norm_name: norm, head_name: head})
    shown = recipe.present_norms_to_inc(part)
    pairs = recipe.family_pairs(family, rec.smooth_pairs, [])
    recipe.smooth_pairs(part, lambda: [head(norm(h)) for h in hidden], pairs, recipe.pair_alpha(rec))
    recipe.restore_norms(part, shown, family.norm_offset)
    # A block-built folder is the engine's alone, which reads an INT8 head: the float roles are for transformers'
    # own generate() on INC's folder (Gemma 2's), which never loads this one.
    engine_only = replace(family, float_roles=())
    recipe.apply_tail(part, {"op": {(head_name, "Linear"): {}}}, rec, engine_only)
    return part


def quantize_embedding(model: nn.Module, source: Source, name: str) -> dict:
    """The input embedding weight-only INT8 (u8 per row with a float scale and zero point), as INC stores it."""
    from torch.ao.nn.quantized import Embedding
    from torch.ao.quantization import float_qparams_weight_only_qconfig

    embed = source.load(model.get_input_embeddings(), name)
    embed.qconfig = float_qparams_weight_only_qconfig
    return Part(model.config, {name: Embedding.from_float(embed)})


COUNTED = ("absorbed_layers", "candidate_layers", "norms_rescaled", "norms_total")


def add_up(rec: recipe.Recipe, family: Family, parts: list[dict], seconds: float) -> dict:
    """The run as recipe.run_summary says a whole-model run: SmoothQuant's evidence and the module kinds
    added up over the blocks and the ends (the final norm counts as rescaled when the recipe smooths lm_head)."""
    modules: dict[str, int] = {}
    for part in parts:
        for k, v in part["modules"].items():
            modules[k] = modules.get(k, 0) + v
    blocks = [p["smoothquant"] for p in parts if p["smoothquant"]]
    evidence: dict = {}
    if blocks:
        evidence = {k: sum(b[k] for b in blocks) for k in COUNTED}
        evidence["norms_rescaled"] += 1 if "lm_head" in rec.smooth_pairs else 0
        evidence["norms_total"] += 1
        evidence |= {"applied": all(b["applied"] for b in blocks), "inc_log": blocks[0]["inc_log"]}
    summary = recipe.run_summary(rec, family, evidence, dict(sorted(modules.items())), seconds)
    return summary | {"block_by_block": len(blocks)}


def write_folder(source: Source, work: Path, out: Path, tokenizer) -> None:
    """The INT8 folder: the engine's tensors (one file, or shards of at most SHARD_BYTES with an index), the
    config as a loader wants it (dict outputs, a KV cache, lm_head untied), tokenizer and generation config."""
    parts = [work / "ends.safetensors"] + sorted(work.glob("block-*.safetensors"))
    shards, size = [[]], 0
    for f in parts:
        if shards[-1] and size + f.stat().st_size > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(f)
        size += f.stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    names = (
        [engine_file.ENGINE_FILE]
        if len(shards) == 1
        else [engine_file.shard_name(i, len(shards)) for i in range(len(shards))]
    )
    weight_map = {}
    for name, group in zip(names, shards):
        tensors = engine_file.Tensors(group)  # memory-mapped: one tensor at a time is read and written
        layout = {n: (info["dtype"], info["shape"]) for n, (_, info, _) in tensors.where.items()}
        files.write_safetensors(out / name, {n: functools.partial(tensors.get, n) for n in tensors.where},
                                {"format": engine_file.FORMAT}, layout)  # fmt: skip
        weight_map |= dict.fromkeys(tensors.where, name)
        machine.malloc_trim()
    if len(shards) > 1:
        index = {"metadata": {"format": engine_file.FORMAT}, "weight_map": weight_map}
        files.write_file(out / engine_file.ENGINE_INDEX, json.dumps(index, indent=1))
    recipe.write_loader_files(out, source.config.to_dict(), tokenizer, source.generation_config())
