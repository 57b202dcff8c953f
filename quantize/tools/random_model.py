"""Random-weight models of a real model's size, for the bench's --build-config-model: a BF16 folder written a
tensor at a time and its INT8 made block by block, so timing and memory can be measured at sizes no embedded model
has. Their answers are noise: only their speed and memory mean anything."""

from __future__ import annotations

import collections
import functools
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantize import families, files, models
from quantize.maintainer import blockwise, calibration, recipe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Model bodies for --build-config-model, with SmolLM2's 49152-token vocabulary: 0.4b (0.38B parameters) is big
# enough that decode is memory-bound on any CPU; 1.5b is Qwen2.5-1.5B's body (1.46B), 7b Mistral-7B's (7.1B).
SIZES = {
    "0.4b": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 8},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2},
    "7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}  # fmt: skip
BUILD_CONFIG = SIZES["0.4b"]


def build_config_model(
    root: Path,
    tokenizer: PreTrainedTokenizerBase,
    size: dict = BUILD_CONFIG,
    samples: int = 8,
    seed: int = 0,
    family: str = "llama",
) -> tuple[Path, Path]:
    """A model of `family` with random weights saved as BF16 (root/bf16) with `tokenizer`, and its INT8 made with
    the default recipe (root/int8) the way `python -m quantize` makes a model above 1B minus the quality checks: block
    by block. Reused when root/int8 is already an INT8 folder.
    Only its speed and memory mean anything."""

    root = Path(root)
    bf16_dir, int8_dir = root / "bf16", root / "int8"
    if models.is_int8_folder(int8_dir) and (bf16_dir / "config.json").is_file():
        return bf16_dir, int8_dir
    write_random_model(bf16_dir, tokenizer, size, seed, family)
    calib = calibration.calibration_ids(tokenizer, samples)
    # int8_dir is only ever a complete folder, so "already built" can trust it
    partial = root / "int8.partial"
    rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
    blockwise.quantize_by_block(bf16_dir, calib, rec, root / "int8.work", partial, tokenizer)
    files.replace_dir(partial, int8_dir)
    shutil.rmtree(root / "int8.work", ignore_errors=True)
    return bf16_dir, int8_dir


def write_random_model(
    folder: Path, tokenizer: PreTrainedTokenizerBase, size: dict, seed: int, family: str = "llama"
) -> None:
    """A BF16 folder of `family` with transformers' own initialisation (normal(0, initializer_range), norms at
    their identity), written a block per shard and a tensor at a time: a 7B one never sits in memory. Untied,
    like most models of these sizes: lm_head is read in full per token, the embedding only gathered."""
    from transformers import AutoConfig, GenerationConfig

    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        **ids,
        **families.FAMILIES[family].words(size),
    )
    shapes = {n: p.shape for n, p in blockwise.skeleton(config).named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    identity = 1.0 - families.FAMILIES[family].norm_offset  # Gemma's norms scale by 1 + weight
    std = getattr(config, "initializer_range", None) or config.init_std  # OPT's config calls it init_std

    def tensor(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.full(shapes[name], identity, dtype=torch.bfloat16)
        if name.endswith("norm.bias"):
            return torch.zeros(shapes[name], dtype=torch.bfloat16)
        return torch.randn(shapes[name], generator=generator).mul_(std).bfloat16()

    groups = collections.defaultdict(list)  # one shard per block, one for the ends
    for name in shapes:
        block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "ends"
        groups[block].append(name)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        files.write_safetensors(
            folder / shard, {n: functools.partial(tensor, n) for n in names}, {"format": "pt"}
        )
        weight_map |= dict.fromkeys(names, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    files.write_file(folder / "model.safetensors.index.json", json.dumps(index, indent=1))
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(folder)
    GenerationConfig(**ids).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
