"""`python -m quantize` on architectures beyond Llama, each a tiny model built from its transformers config (random
weights, the default tokenizer): real INT8 modules, SmoothQuant's scales folded exactly (norm / s, next Linear's
columns * s), the folder reloads with INCModelForCausalLM and generates with a KV cache, and its logits follow the
FP32 model's. Families Neural Compressor cannot smooth stop with one sentence."""

import json

import pytest
import torch
from conftest import TINY_LLAMA, run_cli
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.slow  # the whole command on each family
FAST = ("--skip-baseline", "--calibration-samples", "4", "--bench-tokens", "4", "--bench-rounds", "1")
# family -> (the Linears right after each norm, the norm that feeds them); names as transformers 4.45 has them
FOLDS = {
    "phi3": {"input_layernorm": ["self_attn.qkv_proj"], "post_attention_layernorm": ["mlp.gate_up_proj"]},
}
INT8_LINEARS = {
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear",
    "torch.ao.nn.quantized.modules.linear.Linear",
}


def leaf(module):
    """The INT8 Linear itself: INC may nest it in wrappers (`.module`)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def tiny(tmp_path, tokenizer, family: str, **extra):
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **TINY_LLAMA, **ids, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / family
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FOLDS))
def test_family_quantizes_with_smoothquant_folded_exactly(tmp_path, tokenizer, family):
    from optimum.intel import INCModelForCausalLM

    src = tiny(tmp_path, tokenizer, family)
    out = tmp_path / "int8"
    proc = run_cli("--model", str(src), "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32 = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    int8 = INCModelForCausalLM.from_pretrained(out).model.eval()

    kinds = {n: f"{type(m).__module__}.{type(m).__name__}" for n, m in int8.named_modules()}
    linears = {n: k for n, k in kinds.items() if k.endswith(".Linear")}
    assert linears and set(linears.values()) <= INT8_LINEARS, linears  # every Linear runs INT8 kernels
    assert not any(mark in k for k in kinds.values() for mark in ("QDQ", "FakeQuant", "SQLinearWrapper"))

    for i in range(fp32.config.num_hidden_layers):  # the fold: norm' = norm / s and W' = W * s, per channel
        for norm, consumers in FOLDS[family].items():
            before = fp32.get_submodule(f"model.layers.{i}.{norm}").weight.detach()
            after = int8.get_submodule(f"model.layers.{i}.{norm}").weight.detach().float()
            s = before / after
            assert s.std() / s.mean() > 0.05, "one constant factor is not smoothing"
            for name in consumers:
                w = fp32.get_submodule(f"model.layers.{i}.{name}").weight.detach()
                w_int8 = leaf(int8.get_submodule(f"model.layers.{i}.{name}")).weight().dequantize()
                folded = (w_int8 - w * s[None, :]).abs().max() / w.abs().max()
                unfolded = (w_int8 - w).abs().max() / w.abs().max()
                assert folded < 0.05 and unfolded > 2 * folded, (name, float(folded), float(unfolded))

    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.inference_mode():
        steps = int8.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        a, b = int8(ids).logits[0].flatten(), fp32(ids).logits[0].flatten()
    assert steps.shape[1] == ids.shape[1] + 6
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["quality"]["int8"]["perplexity_ratio"] > 0


def test_gemma_is_refused_in_one_sentence(tmp_path, tokenizer):
    src = tiny(tmp_path, tokenizer, "gemma2", head_dim=16)
    proc = run_cli("--model", str(src), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "'gemma2' cannot be smoothed" in proc.stderr and "(1 + weight)" in proc.stderr
    assert not (tmp_path / "o").exists()
