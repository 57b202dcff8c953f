"""What a Neural Compressor run leaves in the quantizing process: none of its FP32 copies. Unchecked, each run left
two behind (torch's FX helper cache kept every GraphModule INC built, TorchScript kept SmoothQuant's frozen trace)
and the INT8 model kept its FP32 originals through methods INC copied onto it, so a tuning search grew by a model
per trial and the app kept them after its first-start build."""

import ctypes
import gc
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.slow  # three INC runs on a 60M model

# big enough that one FP32 copy (250 MB) stands far above the allocator's noise
SIZE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4}  # fmt: skip


def resident_bytes() -> int:
    """After a full collection, with the heap's free pages given back: what the process really holds."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **SIZE)
    return AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)


def quantize(model, tokenizer, workdir):
    from quantize.maintainer import calibration, recipe

    calib = calibration.calibration_ids(tokenizer, 2)
    return recipe.quantize(model, calib, recipe.RECIPES[recipe.DEFAULT_RECIPE], workdir)


def test_the_int8_model_holds_no_fp32_linear(model, tokenizer, tmp_path):
    result = quantize(model, tokenizer, tmp_path)
    gc.collect()
    known = {id(m) for m in model.modules()} | {id(m) for m in result.model.modules()}
    fp32 = [
        m
        for m in gc.get_objects()
        if type(m) is torch.nn.Linear and id(m) not in known and m.weight.dtype == torch.float32
    ]
    # every Linear of this recipe ships as dynamic INT8: an FP32 one alive anywhere is a leftover copy
    assert fp32 == [], f"{len(fp32)} FP32 Linears outlive the run, e.g. {fp32[0]}"


def test_quantizing_again_does_not_grow_the_process(model, tokenizer, tmp_path):
    fp32_copy = 4 * sum(p.numel() for p in model.parameters())
    quantize(model, tokenizer, tmp_path / "warm")  # imports, INC's first-run state
    before = resident_bytes()
    quantize(model, tokenizer, tmp_path / "again")
    grown = resident_bytes() - before
    assert grown < fp32_copy / 4, f"one more run grew the process by {grown / fp32_copy:.2f} FP32 copies"
