"""`python -m quantize` on architectures beyond Llama, each a tiny model built from its transformers config (random
weights, the default tokenizer): real INT8 modules, SmoothQuant's scales folded exactly (norm / s, next Linear's
columns * s), the folder reloads with INCModelForCausalLM and generates with a KV cache, and its logits follow the
FP32 model's. Families Neural Compressor cannot smooth stop with one sentence."""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_LLAMA, TINY_OPT, run_cli, running_app
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.slow  # the whole command on each family
# The recipe alone (no tuning search): these random tiny models show the fold, not quality (through INC's loader a
# prompt shares one activation scale, so a random model can miss the bar in the long-prompt mode).
FAST = ("--skip-baseline", "--calibration-samples", "4", "--bench-tokens", "4", "--bench-rounds", "1",
        "--tune-trials", "1")  # fmt: skip
# family -> its layers, each norm with the Linears right after it, and what the norm multiplies by (offset +
# weight: Gemma's is 1 + weight); names as transformers 4.45 has them.
FOLDS = {
    "phi3": ("model.layers", {"input_layernorm": ["self_attn.qkv_proj"],
                              "post_attention_layernorm": ["mlp.gate_up_proj"]}, 0.0),
    "gemma2": ("model.layers", {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                "pre_feedforward_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}, 1.0),
    "gemma": ("model.layers", {"post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}, 1.0),
    "opt": ("model.decoder.layers", {"self_attn_layer_norm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                     "final_layer_norm": ["fc1"]}, 0.0),
    "bloom": ("transformer.h", {"input_layernorm": ["self_attention.query_key_value"],
                                "post_attention_layernorm": ["mlp.dense_h_to_4h"]}, 0.0),
    "mpt": ("transformer.blocks", {"norm_1": ["attn.Wqkv"], "norm_2": ["ffn.up_proj"]}, 0.0),
}  # fmt: skip
SIZES = {  # the tiny size in each config's own words
    "phi3": TINY_LLAMA,
    "gemma2": {**TINY_LLAMA, "head_dim": 16},
    "gemma": {**TINY_LLAMA, "head_dim": 16},
    "opt": TINY_OPT,
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
    "mpt": {"d_model": 64, "n_layers": 2, "n_heads": 4, "expansion_ratio": 2},
}  # fmt: skip
# Linears that stay float on purpose: transformers' Gemma 2 generate() reads lm_head.weight's dtype
FLOAT = {"gemma2": {"lm_head"}}
INT8_LINEARS = {
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear",
    "torch.ao.nn.quantized.modules.linear.Linear",
}


def leaf(module):
    """The INT8 Linear itself: INC may nest it in wrappers (`.module`)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def rows(w: torch.Tensor) -> torch.Tensor:
    """Each row over its largest |value|: a Linear that also produces a smoothed pair's input (v_proj for
    o_proj, up_proj or fc1 for the next Linear) has its rows divided too; the columns are what the norm's fold
    scales."""
    return w / w.abs().amax(1, keepdim=True)


def tiny(tmp_path, tokenizer, family: str, **extra):
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **SIZES[family], **ids, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / family
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """family -> (its tiny BF16 folder, the INT8 folder `python -m quantize` wrote from it), each made once."""
    folders = {}

    def get(family: str):
        if family not in folders:
            root = tmp_path_factory.mktemp(family)
            src, out = tiny(root, tokenizer, family), root / "int8"
            proc = run_cli("--model", str(src), "--out", str(out), *FAST)
            assert proc.returncode == 0, proc.stderr[-3000:]
            folders[family] = src, out
        return folders[family]

    return get


@pytest.mark.parametrize("family", list(FOLDS))
def test_family_quantizes_with_smoothquant_folded_exactly(built, tokenizer, family):
    from optimum.intel import INCModelForCausalLM

    src, out = built(family)
    card = (out / "README.md").read_text()
    for measured in ("bench.json", "frontier.json"):  # the embedded default's, not this model's
        assert json.loads((ROOT / "quantize" / "data" / measured).read_text())["command"] not in card, (
            measured
        )
    # a local folder with no Hub name: the card names the folder, never the default model, as its base
    assert ModelCard.load(out / "README.md").data.base_model is None
    assert f"INT8 version of the local model `{src.name}`" in card and "SmolLM2" not in card
    report = (out / "quantize_report.json").read_text()
    assert str(src.parent) not in report + card  # where the maintainer's files lie stays on their machine
    fp32 = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    int8 = INCModelForCausalLM.from_pretrained(out).model.eval()

    kinds = {n: f"{type(m).__module__}.{type(m).__name__}" for n, m in int8.named_modules()}
    linears = {
        n: k
        for n, k in kinds.items()
        if k.endswith(".Linear") and n.split(".")[0] not in FLOAT.get(family, ())
    }
    assert linears and set(linears.values()) <= INT8_LINEARS, linears  # every Linear runs INT8 kernels
    assert not any(mark in k for k in kinds.values() for mark in ("QDQ", "FakeQuant", "SQLinearWrapper"))

    layers, norms, offset = FOLDS[family]
    for i in range(fp32.config.num_hidden_layers):  # the fold: norm' = norm / s and W' = W * s, per channel
        for norm, consumers in norms.items():
            before = fp32.get_submodule(f"{layers}.{i}.{norm}").weight.detach() + offset
            after = int8.get_submodule(f"{layers}.{i}.{norm}").weight.detach().float() + offset
            s = before / after
            assert s.std() / s.mean() > 0.05, "one constant factor is not smoothing"
            for name in consumers:
                w = fp32.get_submodule(f"{layers}.{i}.{name}").weight.detach()
                w_int8 = leaf(int8.get_submodule(f"{layers}.{i}.{name}")).weight().dequantize()
                folded, unfolded = rows(w_int8) - rows(w * s[None, :]), rows(w_int8) - rows(w)
                folded, unfolded = folded.abs().max(), unfolded.abs().max()
                assert folded < 0.05 and unfolded > 2 * folded, (name, float(folded), float(unfolded))

    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.inference_mode():
        steps = int8.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        a, b = int8(ids).logits[0].flatten(), fp32(ids).logits[0].flatten()
    assert steps.shape[1] == ids.shape[1] + 6
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["quality"]["int8"]["perplexity_ratio"] > 0


def test_a_family_inc_cannot_smooth_is_refused_in_one_sentence(tmp_path, tokenizer):
    size = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    SIZES["gpt_neox"] = size
    src = tiny(tmp_path, tokenizer, "gpt_neox")
    proc = run_cli("--model", str(src), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "'gpt_neox' cannot be smoothed" in proc.stderr and "parallel attention" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


class Trap:
    """A pickle that leaves a mark when loaded: planted as pytorch_model.bin, it shows whether anything unpickled."""

    def __init__(self, mark) -> None:
        self.mark = str(mark)

    def __reduce__(self):
        return (open, (self.mark, "w"))


# The families the engine runs beyond Llama's (quantize/families.py), as their transformers 4.45 files compute them:
# Phi-3's fused Linears, Gemma's (1 + weight) norms, GeGLU and scaled embedding, Gemma 2's extra norms and
# soft-capping, OPT's LayerNorms with biases, learned positions and ReLU MLP, BLOOM's and MPT's ALiBi, fused q/k/v
# and GELU MLPs. tests/test_engine.py holds the engine
# to INC on the same folders, logits and 64 greedy tokens.
ENGINE_FAMILIES = ("phi3", "gemma", "gemma2", "opt", "bloom", "mpt")


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_the_app_serves_the_family_on_the_engine_without_a_pickle(built, tmp_path, tokenizer, family):
    """The INT8 folder `python -m quantize` wrote is served by the engine, BF16 too (the header names both), the app
    answers as that folder's model does, and nothing in the app unpickles: its pytorch_model.bin is a trap."""
    from gradio_client import Client
    from test_app_models import expected_answer
    from test_app_server import app_page

    from app import DEFAULT_SYSTEM
    from quantize.runtime.chat import text_of

    src, out = built(family)
    folder, mark = tmp_path / "int8", tmp_path / "unpickled"
    shutil.copytree(out, folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(mark)))
    env = dict(
        Q8CHAT_BF16_MODEL=str(src), Q8CHAT_INT8_MODEL=str(folder), Q8CHAT_CACHE=str(tmp_path / "cache")
    )
    errors: list[str] = []
    with running_app(tmp_path / f"app-{family}.log", **env) as (url, _):
        history, *_ = Client(url, verbose=False).predict(
            "Hello", [], DEFAULT_SYSTEM, 8, 0.0, 0.95, True, api_name="/chat"
        )
        with app_page(url, errors) as page:
            header = page.locator("#header").inner_text()
    assert "Q8 engine, FBGEMM INT8" in header and "Q8 engine, BF16" in header, header
    assert text_of(history[-1]["content"]).strip() == expected_answer(out, tokenizer, "Hello", 8)
    assert not mark.exists()
    assert not errors, errors


# Resident memory a served model adds, read from /proc in a fresh interpreter (nothing else loaded there).
ADDED = """
import gc, sys, ctypes
from pathlib import Path
import torch
from quantize.runtime import decoders
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
before = rss()
decoder = getattr(decoders, sys.argv[1])(Path(sys.argv[2]))
with torch.inference_mode():
    decoder.forward(torch.tensor([1, 2, 3]), decoder.new_cache(8))
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
print(rss() - before)
"""


# Not gemma2: transformers reads its lm_head as float (its float_roles in quantize/families.py), so a whole-model INT8 folder
# keeps it BF16, and in a tiny model lm_head is nearly all the weights (a block-built one, above 1B, has it INT8).
@pytest.mark.parametrize("family", ["phi3", "gemma", "opt", "bloom", "mpt"])
def test_int8_adds_less_resident_memory_than_bf16(built, family):
    """As the app serves them: INC's loader held 382-411 MB for these tiny INT8 folders, against 41-43 MB for BF16."""
    src, out = built(family)
    added = {}
    for opener, folder in (("open_int8", out), ("open_bf16", src)):
        proc = subprocess.run([sys.executable, "-c", ADDED, opener, str(folder)], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        added[opener] = int(proc.stdout.split()[-1])
    assert added["open_int8"] < added["open_bf16"], added
