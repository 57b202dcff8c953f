"""The decoders that serve a folder: the engine for the families it runs, else a transformers model behind the
engine's interface (`HFDecoder`, the generic path). A decoder has `new_cache(max_len)`, `forward(ids, cache)`,
`label`, `weight_bytes` and `bytes_per_token`; generate.stream runs any of them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import DynamicCache

from quantize import engine_file, models
from quantize.errors import ModelError
from quantize.runtime import engine


class HFCache:
    """What a transformers model hands back as its cache (a DynamicCache or legacy tuples)."""

    def __init__(self, past: DynamicCache | None) -> None:
        self.past, self.length = past, 0


class HFDecoder:
    """The generic path: any transformers causal LM (INC's INT8 ones too) behind the engine's interface."""

    def __init__(self, model: torch.nn.Module, label: str) -> None:
        self.model, self.label, self.config = model.eval(), label, model.config.to_dict()
        # BLOOM (ALiBi) and MPT have no position table; 4096 bounds a chat there
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 4096

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: all but the input embedding, of which one row is gathered. A tied
        embedding is also lm_head, read in full, so it stays in."""
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        out_ptrs = {p.data_ptr() for p in out.parameters()} if out is not None else set()
        tied = any(p.data_ptr() in out_ptrs for p in emb.parameters())
        return self.weight_bytes - (0 if tied else weight_bytes(emb))

    @property
    def position_bytes(self) -> int:
        """K and V of every layer at one position, from the config's names (0 where a family names them otherwise)."""
        c = self.model.config
        layers, heads = getattr(c, "num_hidden_layers", 0), getattr(c, "num_attention_heads", 0)
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", 0) // heads if heads else 0)
        return 2 * layers * kv_heads * head_dim * self.model.dtype.itemsize

    def new_cache(self, max_len: int | None = None) -> HFCache:
        # models that only take legacy tuples (BLOOM, MPT in transformers 4.45) start from None
        return HFCache(DynamicCache() if self.model._supports_cache_class else None)

    def forward(self, ids: torch.Tensor, cache: HFCache, all_logits: bool = False) -> torch.Tensor:
        out = self.model(input_ids=ids.reshape(1, -1), past_key_values=cache.past, use_cache=True)
        cache.past, cache.length = out.past_key_values, cache.length + ids.numel()
        return (out.logits[0] if all_logits else out.logits[0, -1:]).float()


def weight_file_bytes(folder: Path) -> int:
    """What serving the folder reads: the engine's or the model's safetensors, else its pickled weights."""
    files = engine_file.safetensors_files(Path(folder)) or sorted(Path(folder).glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files)


def open_int8(path: Path, batched: bool = False):
    """The decoder that serves an INT8 folder: the engine when the folder has its safetensors and a family the
    engine runs, else INC's model on the generic path (a pickle: only for folders the caller trusts). `batched`:
    see engine.load."""
    path = Path(path)
    if not models.is_int8_folder(path):
        raise ModelError(
            f"{path} is not an INT8 folder written by `python -m quantize` (no inc_config.json or engine.safetensors)."
        )
    if engine.is_engine_folder(path) and engine_file.has_engine_file(path):
        try:
            return engine.load(path, batched=batched)
        except (KeyError, ValueError, OSError, RuntimeError) as e:
            raise ModelError(
                f"Cannot load the INT8 model in {path}: {type(e).__name__}: {str(e)[:200]}"
            ) from e
    return HFDecoder(models.load_inc_int8(path), "transformers + INC (generic path)")


@contextlib.contextmanager
def served(model: torch.nn.Module, label: str) -> Iterator:
    """An INT8 model still in memory, served as the app would serve its folder: Q8-Chat's engine where it runs
    the family, transformers otherwise. So a candidate or a baseline is measured with the kernels that ship."""
    with tempfile.TemporaryDirectory() as folder:
        if engine.runs(model.config.to_dict()) and engine_file.write_engine_file(model, Path(folder)):
            model.config.to_json_file(Path(folder) / "config.json")
            yield engine.load(Path(folder))
        else:
            yield HFDecoder(model, label)


def open_bf16(path: Path, trust_remote_code: bool = False):
    """The decoder that serves the BF16 original: the engine for safetensors folders of a family it runs (so it
    runs the INT8 model's loop), transformers otherwise."""
    if engine.is_engine_folder(Path(path)):
        return engine.load(Path(path))
    return HFDecoder(models.load_bf16(path, trust_remote_code), "transformers BF16 (generic path)")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a forward pass reads: float parameters plus the packed INT8 weights of quantized modules
    (which are not parameters, so model.parameters() misses them)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for mod in model.modules():
        if type(mod).__module__.startswith("torch.ao.nn.quantized") and callable(
            getattr(mod, "weight", None)
        ):
            w = mod.weight()
            total += w.numel() * w.element_size()
    return total
