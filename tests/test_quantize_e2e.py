"""`python -m quantize` end to end on the embedded default model (real weights): real INT8 kernels, SmoothQuant
provably applied, the folder reloads with INCModelForCausalLM and generates with a KV cache, the quality bar."""

import json
import re

import pytest
import torch

from quantize import card, models, recipe
from quantize.generate import Sampling, stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(int8_run):
    return json.loads((int8_run["out"] / "quantize_report.json").read_text())


@pytest.fixture(scope="module")
def int8(int8_run):
    return models.load_int8(int8_run["out"])


def _leaf_linears(model):
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.Linear or type(mod).__module__.startswith("torch.ao.nn.quantized") and \
                type(mod).__name__ == "Linear":
            yield name, mod


def test_real_int8_kernels_no_fake_quant(report, int8):
    kinds = recipe.module_counts(int8)
    assert not any(m in k for k in kinds for m in recipe.FAKE_QUANT_MARKERS)
    assert report["modules"] == kinds  # the report describes the folder that ships
    leaves = dict(_leaf_linears(int8))
    assert len(leaves) == 211  # 30 layers x 7 Linears + lm_head
    int8_leaves = {n: m for n, m in leaves.items() if type(m) is not torch.nn.Linear}
    assert len(int8_leaves) >= 150
    for m in int8_leaves.values():  # real INT8 weights, per output channel, in FBGEMM-packed modules
        w = m.weight()
        assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine
    # every Linear runs what the recipe says: static INT8 unless its tail names another mode
    rec = recipe.RECIPES[report["recipe"]["name"]]
    kind = {"dynamic": recipe.DYNAMIC_INT8, "bf16": "torch.nn.modules.linear.Linear",
            "fp32": "torch.nn.modules.linear.Linear"}
    for name, mod in leaves.items():
        bare = re.sub(r"(\.module)+$", "", name)  # INC nests wrappers: lm_head.module.module is lm_head's Linear
        modes = [mode for pattern, mode in rec.tail if re.fullmatch(pattern, bare)]
        got = f"{type(mod).__module__}.{type(mod).__name__}"
        assert got == (kind[modes[0]] if modes else recipe.STATIC_INT8), (name, got)
        if modes and modes[0] != "dynamic":
            assert mod.weight.dtype == (torch.bfloat16 if modes[0] == "bf16" else torch.float32), name
    assert report["disk_bytes"] < 2 * 134_515_008  # smaller than the BF16 weights, even with a BF16 tail


def test_smoothquant_was_applied(report):
    sq = report["smoothquant"]
    assert sq["applied"], sq
    assert sq["absorbed_layers"] == 150 and sq["candidate_layers"] == 211
    # folded scales live in the RMSNorm weights: both norms of every layer changed
    assert sq["norms_rescaled"] == 60


def test_reloads_with_inc_and_generates_with_kv_cache(int8_run, int8, tokenizer):
    from optimum.intel import INCModelForCausalLM

    inc = INCModelForCausalLM.from_pretrained(int8_run["out"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = inc.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=-1,
                       return_dict_in_generate=True)
    cache = out.past_key_values  # a Cache object or the legacy ((k, v), ...) tuples, depending on the path
    cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2]
    assert cached >= ids.shape[1] + 10
    ours = [s.token_id for s in stream(int8, ids, Sampling(max_new_tokens=12))]
    assert out.sequences[0, ids.shape[1]:].tolist() == ours  # same model, same loop semantics
    assert "Paris" in tokenizer.decode(ours)


def test_report_and_card(int8_run, report):
    out = int8_run["out"]
    for name in ("config.json", "pytorch_model.bin", "inc_config.json", "tokenizer.json", "README.md",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    from huggingface_hub import ModelCard

    c = ModelCard.load(out / "README.md")
    assert c.data.base_model == models.DEFAULT_MODEL_HUB_ID
    assert c.data.library_name and c.data.pipeline_tag == "text-generation"
    assert "smoothquant" in c.data.tags
    assert f"{report['quality']['int8']['perplexity']:.2f}" in c.text  # the measured numbers, not placeholders
    assert report["versions"]["neural-compressor"] == "3.7.1"
    assert report["speed"]["models"]["int8"]["median_ms"] > 0 and report["cpu"]["model"]


def test_quality_bar(report):
    q = report["quality"]["int8"]
    assert q["perplexity_ratio"] <= card.MAX_PERPLEXITY_RATIO, q
    assert q["top1_agreement"] >= card.MIN_TOP1_AGREEMENT, q
    assert report["quality_bar"]["met"]


def test_smoothquant_beats_no_smoothquant(report):
    with_sq, without = report["quality"]["int8"], report["quality"]["int8_no_sq"]
    assert with_sq["perplexity"] < without["perplexity"]


def test_pushed_in_one_commit(int8_run):
    pushed = int8_run["pushed"]
    local = {p.name: p.read_bytes() for p in int8_run["out"].iterdir() if p.is_file()}
    assert {k: v for k, v in pushed.items() if k != ".gitattributes"} == local
    assert "Pushed:" in int8_run["stdout"]
