"""`python -m quantize` end to end on the embedded default model (real weights): real INT8 kernels, SmoothQuant
provably applied, the folder reloads with INCModelForCausalLM and generates with a KV cache, the quality bar."""

import json
import re

import pytest
import torch
from conftest import ROOT

from quantize import card, models, recipe
from quantize.generate import HFDecoder

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
    assert "Paris" in tokenizer.decode(out.sequences[0, ids.shape[1] :])
    # Our loop drives the same model through the same cache: generate() masks the prompt another way, and this INT8
    # model in INC's 7-bit activations turns rounding-level differences into other tokens (1e-6 relative noise
    # flips ~15% of argmaxes: see test_engine_serves_the_shipped_folder_as_inc_does), so tokens are not compared.
    decoder = HFDecoder(int8, "INC")
    cache = decoder.new_cache()
    decoder.forward(ids.reshape(-1), cache)
    for token in out.sequences[0, ids.shape[1] : ids.shape[1] + 3].tolist():
        decoder.forward(torch.tensor([token]), cache)
    past = cache.past
    assert (past.get_seq_length() if hasattr(past, "get_seq_length") else past[0][0].shape[-2]) == ids.shape[1] + 3


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


def test_engine_serves_the_shipped_folder_as_inc_does(int8_run, int8, bf16, tokenizer):
    """The engine (what the app serves) in INC's activation precision against INCModelForCausalLM on the same
    folder. This model is chaotic under INT8 noise (1e-6 relative noise in one norm flips ~15% of argmaxes), so
    two implementations cannot match token for token: they must measure the same against BF16 (the config-built
    models in test_engine.py do match token for token)."""
    from quantize import engine, evaluate

    ours = engine.load(int8_run["out"], reduce_range=True)
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :1024]
    ref_nll, ref_top = evaluate.teacher_forced(HFDecoder(bf16, "BF16"), ids)
    got = {}
    for name, decoder in (("engine", ours), ("inc", HFDecoder(int8, "INC"))):
        nll, top = evaluate.teacher_forced(decoder, ids)
        got[name] = (nll - ref_nll, (top == ref_top).float().mean().item())
    assert abs(got["engine"][0] - got["inc"][0]) < 0.02, got  # log-perplexity ratio within 2%
    assert abs(got["engine"][1] - got["inc"][1]) < 0.04, got
    # every Linear INC runs as INT8 is INT8 in the engine's file too
    inc_int8 = {re.sub(r"(\.module)+$", "", n) for n, m in _leaf_linears(int8) if type(m) is not torch.nn.Linear}
    assert {n for n, kind in ours.kinds.items() if kind == "int8"} == inc_int8


def test_engine_load_never_builds_a_float_model(int8_run, bf16):
    """Peak memory while the engine loads the default INT8 folder, in a fresh process: far below the FP32 model
    INC's loader builds first (4 bytes per parameter)."""
    import subprocess
    import sys

    # VmHWM, reset first: a child's ru_maxrss starts at its parent's (this test process holds several models)
    code = ("import sys, torch, quantize.engine as e\n"
            "hwm = lambda: int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1])\n"
            "open('/proc/self/clear_refs', 'w').write('5'); before = hwm()\n"
            "m = e.load(sys.argv[1]); m.forward(torch.tensor([1, 2]), m.new_cache(4))\n"
            "print((hwm() - before) * 1024)")
    proc = subprocess.run([sys.executable, "-c", code, str(int8_run["out"])], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fp32_bytes = 4 * sum(p.numel() for p in bf16.parameters())
    assert int(proc.stdout.split()[-1]) < 0.6 * fp32_bytes, (proc.stdout, fp32_bytes)
