"""`python -m quantize` end to end on the embedded default model (real weights): real INT8 kernels, SmoothQuant
provably applied, the folder reloads with INCModelForCausalLM and generates with a KV cache, the quality bar."""

import json

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


def test_real_int8_kernels_no_fake_quant(report, int8):
    kinds = recipe.module_counts(int8)
    assert kinds.get(recipe.STATIC_INT8, 0) >= 150  # q/k/v/gate/up of 30 layers run static INT8 (FBGEMM)
    assert not any(m in k for k in kinds for m in recipe.FAKE_QUANT_MARKERS)
    # the 61 layers SmoothQuant cannot smooth (30 o_proj, 30 down_proj, lm_head) run what the recipe's tail says
    rec = recipe.RECIPES[report["recipe"]["name"]]
    want = {"fp32": 0, "dynamic": 0, "bf16": 0}
    for pattern, mode in rec.tail:
        want[mode] += 1 if pattern == recipe.LM_HEAD else 30
    wrapped = [m for m in int8.modules() if type(m).__name__ == "BF16ModuleWrapper"]
    assert len(wrapped) == want["bf16"] and all(m.module.weight.dtype == torch.bfloat16 for m in wrapped)
    assert kinds.get(recipe.DYNAMIC_INT8, 0) == want["dynamic"]
    assert kinds.get("torch.nn.modules.linear.Linear", 0) == want["fp32"] + want["bf16"]
    assert sum(want.values()) == 61
    assert report["modules"] == kinds  # the report describes the folder that ships
    linear = int8.model.layers[0].self_attn.q_proj
    inner = getattr(linear, "module", linear)
    w = inner.weight()
    assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine
    assert report["disk_bytes"] < 0.8 * 2 * 134_515_008  # well under the BF16 size on disk


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
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() >= ids.shape[1] + 10
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
