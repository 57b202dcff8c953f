"""The memory each engine adds once loaded, measured in a fresh child process per model: loading them all in the
bench's own process would mix every model's memory, and freed memory is not always given back."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from quantize import machine, models
from quantize.runtime import decoders
from quantize.runtime.decoders import HFDecoder


def load_footprint(kind: str, folder: str, batched: bool = False) -> dict:
    """In a fresh interpreter (see `footprints`): resident memory one model adds once loaded and run for a token,
    and the peak while loading, both over the process right after its imports. Loading in the bench's own
    process would mix every model's memory. `batched`: INT8 as the app loads it to serve many sequences (its
    second copy of the weights for several rows, where it makes one)."""
    loader = {
        "int8": lambda p: decoders.open_int8(p, batched=batched),
        "bf16": decoders.open_bf16,
        "hf_bf16": lambda p: HFDecoder(models.load_bf16(p), "transformers BF16"),
    }[kind]
    before = machine.settled_rss()
    machine.reset_peak_rss()
    decoder = loader(Path(folder))
    with torch.inference_mode():
        decoder.forward(torch.tensor([1, 2, 3]), decoder.new_cache(8))
    peak = machine.peak_rss_bytes()
    return {
        "added_bytes": machine.settled_rss() - before,
        "load_peak_bytes": peak - before,
    }


def footprints(folders: dict[str, Path], batched: bool = False) -> dict[str, dict]:
    """load_footprint of each engine ("int8", "bf16", "hf_bf16") on its folder, each in its own child process."""
    ctx = multiprocessing.get_context("spawn")  # a clean process per model: nothing inherited, nothing shared
    out = {}
    for kind, folder in folders.items():
        with ctx.Pool(1) as pool:
            out[kind] = pool.apply(load_footprint, (kind, str(folder), batched))
    return out
