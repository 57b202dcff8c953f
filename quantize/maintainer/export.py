"""The INT8 model in the ecosystem's format: a compressed-tensors W8A8 folder (`w8a8/` inside the INT8 folder)
that vLLM serves unchanged (`vllm serve DIR/w8a8`), written from the engine's file.

What it holds: every INT8 Linear's codes and per-output-channel scales as the recipe made them (never quantized
again), with activations quantized per token at run time (symmetric INT8, the scheme vLLM's CPU kernel runs);
the SmoothQuant factors are already folded into the norms before them. lm_head is stored in BF16, its INT8 codes
times their scales, and listed in `ignore`: vLLM quantizes no lm_head of a compressed-tensors model. The embedding,
weight-only INT8 in the engine's file, is stored the same way (BF16 from its codes). A model built block by block
is written a shard per engine shard, one tensor in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from quantize import engine_file, files
from quantize.families import FAMILIES
from quantize.models import EXPORT_DIR

# compressed-tensors' description of the scheme (its QuantizationConfig, as vLLM and llm-compressor write it)
SCHEME = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
    "input_activations": {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "dynamic": True,
    },
}
QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {"group_0": SCHEME},
}
COPIED = ("generation_config.json", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json",
          "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")  # fmt: skip


def dequantized(tensors: engine_file.Tensors, base: str) -> torch.Tensor:
    """A stored INT8 matrix as BF16: codes times their row's scale (less its zero point, for the embedding)."""
    q, scale = tensors.get(f"{base}.qweight").float(), tensors.get(f"{base}.scale").float()[:, None]
    zero = tensors.get(f"{base}.zero_point").float()[:, None] if f"{base}.zero_point" in tensors else 0.0
    return ((q - zero) * scale).bfloat16()


def exported(tensors: engine_file.Tensors, names: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """The compressed-tensors name of each stored tensor in `names`, and how to make it."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        base, _, kind = name.rpartition(".")
        if kind == "qweight" and base != "lm_head" and f"{base}.zero_point" not in tensors:
            out[f"{base}.weight"] = lambda n=name: tensors.get(n)  # the codes as they are
            out[f"{base}.weight_scale"] = lambda b=base: tensors.get(f"{b}.scale").float()[:, None]
        elif kind == "qweight":
            out[f"{base}.weight"] = lambda b=base: dequantized(tensors, b)
        elif kind not in ("scale", "zero_point"):
            out[name] = lambda n=name: tensors.get(n).bfloat16()  # norms, biases, float Linears
    return out


def float_linears(tensors: engine_file.Tensors, config: dict) -> list[str]:
    """The Linears the recipe left in float (a family's float roles): compressed-tensors must be told to leave
    them alone, as lm_head."""
    family = FAMILIES[config["model_type"]]
    tables = {family.embed, family.positions}
    bases = [n.removesuffix(".weight") for n in tensors.where if n.endswith(".weight")]
    return [b for b in bases if b not in tables and len(tensors.where[b + ".weight"][1]["shape"]) == 2]


def export_config(config: dict, ignore: list[str], names: set[str]) -> dict:
    """The model's config with its quantization. A stored lm_head and the embedding come from different codes
    (INT8 W8A8 and weight-only), so they are two matrices now, tied or not before."""
    quantization = QUANTIZATION_CONFIG | {"ignore": sorted({"lm_head", *ignore})}
    untied = {"tie_word_embeddings": False} if "lm_head.weight" in names else {}
    return config | {"quantization_config": quantization, "torch_dtype": "bfloat16"} | untied


def servable_tokenizer(folder: Path) -> None:
    """A tokenizer that transformers 5 and vLLM decode as the app does. The default model's files, converted from
    GGUF, name `LlamaTokenizer`, which transformers 5 rebuilds with SentencePiece's decoder, so a byte-level
    vocabulary came back as 'ĠThe' and 'Ċ'; the generic fast tokenizer takes tokenizer.json as written. Its decoder
    is made byte-level where its pre-tokenizer is."""
    config_path, tok_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not tok_path.is_file() or not config_path.is_file():
        return
    tok = json.loads(tok_path.read_text())
    if "ByteLevel" not in json.dumps(tok.get("pre_tokenizer")):
        return
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    files.write_file(tok_path, json.dumps(tok, ensure_ascii=False))
    config = json.loads(config_path.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    files.write_file(config_path, json.dumps(config, indent=1, ensure_ascii=False))


def write_export(int8_folder: Path, out: Path | None = None) -> Path:
    """The compressed-tensors folder of the INT8 folder `int8_folder` (default: its `w8a8/`). Returns it."""
    int8_folder = Path(int8_folder)
    out = Path(out or int8_folder / EXPORT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    shards = engine_file.safetensors_files(int8_folder)
    config = json.loads((int8_folder / "config.json").read_text())
    weight_map: dict[str, str] = {}
    ignore: list[str] = []
    for i, shard in enumerate(shards):
        tensors = engine_file.Tensors([shard])
        ignore += float_linears(tensors, config)
        name = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        made = exported(tensors, list(tensors.where))
        files.write_safetensors(out / name, made, {"format": "pt"})
        weight_map |= dict.fromkeys(made, name)
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        files.write_file(out / "model.safetensors.index.json", json.dumps(index, indent=1))
    files.write_file(
        out / "config.json", json.dumps(export_config(config, ignore, set(weight_map)), indent=1)
    )
    for name in COPIED:
        if (int8_folder / name).is_file():
            shutil.copyfile(int8_folder / name, out / name)
    servable_tokenizer(out)
    return out
