"""The engine's file, reader and writer side by side: `engine.safetensors` (or its shards and index), the INT8
model INC built as plain tensors under transformers' names, written by `python -m quantize` (and by the runtime,
once, for an INT8 folder that holds only INC's checkpoint), read memory-mapped by the engine and the maintainer
step alike. A BF16 folder's `model.safetensors` is read the same way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from quantize.errors import ModelError

ENGINE_FILE = (
    "engine.safetensors"  # written by `python -m quantize` (next to INC's pytorch_model.bin, if any)
)
ENGINE_INDEX = "engine.safetensors.index.json"  # a large model's shards instead of ENGINE_FILE
FORMAT = "q8chat-int8/1"

# ---------------------------------------------------------------- reading safetensors without copies


class Tensors:
    """Every tensor of a folder's safetensors files, memory-mapped: reading one costs its pages, not the file."""

    DTYPES = {
        "BF16": (np.int16, torch.bfloat16),
        "F16": (np.float16, None),
        "F32": (np.float32, None),
        "I8": (np.int8, None),
        "I64": (np.int64, None),
        "U8": (np.uint8, None),
    }

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, tuple[Path, dict, int]] = {}
        self.metadata: dict = {}
        for path in files:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self.metadata.update(header.pop("__metadata__", None) or {})
            self.where.update({name: (path, info, 8 + n) for name, info in header.items()})

    def __contains__(self, name: str) -> bool:
        return self.stored_name(name) in self.where

    def stored_name(self, name: str) -> str:
        """`name`, or without its first part: a checkpoint saved from the base model has no `model.` (OPT's on
        the Hub: decoder.layers.0…), as transformers' loader allows."""
        return name if name in self.where else name.partition(".")[2]

    def get(self, name: str) -> torch.Tensor:
        path, info, base = self.where[self.stored_name(name)]
        np_dtype, view = self.DTYPES[info["dtype"]]
        # copy-on-write mapping: pages are read from the file when touched, never written back
        array = np.memmap(
            path, dtype=np_dtype, mode="c", offset=base + info["data_offsets"][0], shape=tuple(info["shape"])
        )
        t = torch.from_numpy(array)
        return t.view(view) if view is not None else t


def shard_name(i: int, n: int) -> str:
    return f"engine-{i + 1:05d}-of-{n:05d}.safetensors"


def safetensors_files(folder: Path) -> list[Path]:
    """An INT8 folder's engine file or shards, else a BF16 folder's model file or shards. An index may only name
    files of its own folder: a name with a path in it ('../x', '/etc/x') is refused, not followed."""
    for single, index in ((ENGINE_FILE, ENGINE_INDEX), ("model.safetensors", "model.safetensors.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            names = set(json.loads((folder / index).read_text())["weight_map"].values())
            outside = sorted(
                n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")
            )
            if outside:
                raise ModelError(
                    f"{index} in {folder} names a weight file outside its folder ({outside[0]!r}); refused."
                )
            return sorted(folder / n for n in names)
    return []


def has_engine_file(folder: Path) -> bool:
    return (Path(folder) / ENGINE_FILE).is_file() or (Path(folder) / ENGINE_INDEX).is_file()


# ---------------------------------------------------------------- the file `python -m quantize` writes


def engine_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The INT8 model INC built, as plain tensors under transformers' names: `<linear>.qweight` (s8) and `.scale`
    (per output channel) for FBGEMM dynamic INT8, `.weight` for a BF16/FP32 Linear, the weight-only INT8
    embedding and the norms. None when a module is one the engine does not run the same way (static INT8)."""
    import re

    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        bare = re.sub(r"(\.module)+$", "", name)
        kind = f"{type(mod).__module__}.{type(mod).__name__}"
        if kind == "torch.ao.nn.quantized.dynamic.modules.linear.Linear":
            w, bias = mod.weight(), mod.bias()
            if w.qscheme() != torch.per_channel_affine or w.q_per_channel_zero_points().any():
                return None
            out |= {f"{bare}.qweight": w.int_repr(), f"{bare}.scale": w.q_per_channel_scales().float()}
        elif kind == "torch.ao.nn.quantized.modules.embedding_ops.Embedding":
            w, bias = mod.weight(), None
            out |= {
                f"{bare}.qweight": w.int_repr(),
                f"{bare}.scale": w.q_per_channel_scales().float(),
                f"{bare}.zero_point": w.q_per_channel_zero_points().float(),
            }
        elif type(mod) in (torch.nn.Linear, torch.nn.Embedding):
            w, bias = mod.weight, getattr(mod, "bias", None)
            out[f"{bare}.weight"] = w.detach()
        elif kind.startswith("torch.ao.nn.quantized") and "PackedParams" not in kind:
            return None  # static INT8 needs the calibrated activation scale: the generic path serves it
        else:
            continue
        if bias is not None:
            out[f"{bare}.bias"] = bias.detach().float()
    # the rest as FP32: norms (LayerNorm's bias too), learned positions; INC's wrappers add `.module`
    rest = {re.sub(r"(\.module)+(?=\.[^.]+$)", "", n): p for n, p in model.named_parameters()}
    out |= {n: p.detach().float() for n, p in rest.items() if n not in out}
    return {n: t.contiguous() for n, t in out.items()}


def write_engine_file(model: torch.nn.Module, folder: Path) -> bool:
    """engine.safetensors next to INC's pytorch_model.bin: what the engine (and the app) load, never a pickle."""
    from safetensors.torch import save_file

    tensors = engine_tensors(model)
    if tensors is None:
        return False
    save_file(tensors, str(Path(folder) / ENGINE_FILE), metadata={"format": FORMAT})
    (Path(folder) / ENGINE_FILE).chmod(
        0o644
    )  # safetensors writes it private; it is a model file like the rest
    return True
