"""`python -m quantize` end to end on the embedded default model (real weights): real INT8 kernels, SmoothQuant
provably applied, the folder reloads with INCModelForCausalLM and generates with a KV cache, the quality bar.

What the model is and does is observed here, on the folder the command wrote: its modules and weights, its
predictions on held-out text; the command's own report is only checked where it is the product (the card)."""

import json
import math
import os
import re
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import _SESSION, ROOT, local_hub

from quantize import models
from quantize.runtime import decoders
from quantize.runtime.decoders import HFDecoder

pytestmark = pytest.mark.slow

# SmolLM2-135M: 30 blocks of 7 Linears, plus lm_head.
LAYERS = 30
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LINEARS = {f"model.layers.{i}.{n}" for i in range(LAYERS) for n in BLOCK_LINEARS} | {"lm_head"}
# Real INT8 kernels (FBGEMM, s8 weights packed per output channel): torch's quantized Linear, with an activation
# scale computed per call (dynamic) or calibrated (static). The default recipe makes every Linear one of them.
INT8_LINEARS = {
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear",
    "torch.ao.nn.quantized.modules.linear.Linear",
}
INT8_EMBEDDING = "torch.ao.nn.quantized.modules.embedding_ops.Embedding"  # weight-only INT8, rows gathered
# Fake quantization: INC's QDQ path and SmoothQuant wrapper (FP32 weights and GEMMs between quantize/dequantize
# steps), torch's fake-quant modules and observers (which live in torch.ao.quantization).
FAKE_QUANT = ("QDQ", "FakeQuant", "SQLinearWrapper", "Observer", "torch.ao.quantization.")
# The project's quality bar (issue #2): INT8 against BF16 on held-out text.
MAX_PERPLEXITY_RATIO = 1.10
MIN_TOP1_AGREEMENT = 0.85
# and on a 512-token prompt in one pass (issue #32: one activation scale per token made it as good as decoding)
LONG_MAX_PERPLEXITY_RATIO = 1.03
LONG_MIN_TOP1_AGREEMENT = 0.90


@pytest.fixture(scope="module")
def report(int8_run):
    return json.loads((int8_run["out"] / "quantize_report.json").read_text())


@pytest.fixture(scope="module")
def int8(int8_run):
    return models.load_inc_int8(int8_run["out"])


def _kind(mod) -> str:
    return f"{type(mod).__module__}.{type(mod).__name__}"


def _leaf_linears(model):
    for name, mod in model.named_modules():
        if (
            type(mod) is torch.nn.Linear
            or type(mod).__module__.startswith("torch.ao.nn.quantized")
            and type(mod).__name__ == "Linear"
        ):
            yield name, mod


def _linears_by_name(model) -> dict:
    """Each Linear under its transformers name (INC nests wrappers: lm_head.module.module is lm_head's Linear)."""
    leaves = list(_leaf_linears(model))
    named = {re.sub(r"(\.module)+$", "", n): m for n, m in leaves}
    assert len(named) == len(leaves), "a Linear appears twice"
    return named


def _safetensors_header(path) -> dict:
    """{tensor name: {dtype, shape, data_offsets}} from the file's own header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    return header


def test_real_int8_kernels_no_fake_quant(int8_run, int8, default_dir):
    kinds = {_kind(m) for m in int8.modules()}
    assert not [k for k in kinds if any(marker in k for marker in FAKE_QUANT)], kinds
    linears = _linears_by_name(int8)
    assert set(linears) == LINEARS  # 211: every Linear of the model, each once
    for name, mod in linears.items():  # real INT8 weights, per output channel, in FBGEMM-packed modules
        assert _kind(mod) in INT8_LINEARS, (name, _kind(mod))
        w = mod.weight()
        assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine, name
    embeddings = [m for m in int8.modules() if _kind(m) == INT8_EMBEDDING]
    assert len(embeddings) == 1 and embeddings[0].weight().dtype == torch.quint8
    # the file the app's engine reads holds the same: s8 matrices, u8 embedding rows, no float copy of either
    header = _safetensors_header(int8_run["out"] / "engine.safetensors")
    for name in LINEARS:
        assert header[f"{name}.qweight"]["dtype"] == "I8" and f"{name}.weight" not in header, name
    assert header["model.embed_tokens.qweight"]["dtype"] == "U8" and "model.embed_tokens.weight" not in header

    # On disk, against the BF16 original's weights (269 MB: 134.5M weights x 2 bytes, the 49152x576 embedding
    # tied to lm_head, so stored once). INT8 stores a byte per weight plus a float scale per row: the blocks'
    # 106M weights go from 212 to 106 MB; the vocabulary matrix, untied for INT8 (embedding and lm_head are
    # separate INT8 copies), stays 57 MB. Expected ~0.62 of BF16 (measured: 0.61 engine.safetensors, 0.62
    # pytorch_model.bin). 0.70 leaves room for scales and metadata, not for a float copy of any block matrix.
    bf16_bytes = (default_dir / "model.safetensors").stat().st_size
    for name in ("engine.safetensors", "pytorch_model.bin"):
        size = (int8_run["out"] / name).stat().st_size
        assert size < 0.70 * bf16_bytes, (name, size, bf16_bytes)


def test_smoothquant_folded_its_scales_into_the_norms(int8, default_dir):
    """SmoothQuant divides each input channel j of a Linear's activations by s_j and multiplies the Linear's
    column j by s_j; folding puts the division into the RMSNorm that feeds it. Observed against the BF16 weights:
    every norm of the INT8 model is the BF16 norm divided by per-channel factors s (not one factor), and the
    Linear it feeds is the BF16 matrix with its columns multiplied by that same s, within INT8 rounding."""
    from safetensors import safe_open

    with safe_open(str(default_dir / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k).float() for k in f.keys()}
    original.setdefault("lm_head.weight", original["model.embed_tokens.weight"])  # tied in BF16
    norms = {n: p.detach().float() for n, p in int8.named_parameters() if n.endswith("norm.weight")}
    linears = _linears_by_name(int8)
    # q_proj and gate_proj: the first consumer of each norm (v_proj and up_proj rows carry other scales too)
    pairs = [
        (f"model.layers.{i}.input_layernorm", f"model.layers.{i}.self_attn.q_proj") for i in range(LAYERS)
    ]
    pairs += [
        (f"model.layers.{i}.post_attention_layernorm", f"model.layers.{i}.mlp.gate_proj")
        for i in range(LAYERS)
    ]
    pairs += [("model.norm", "lm_head")]
    assert len(pairs) == len(norms) == 61
    bad = []
    for norm, consumer in pairs:
        before = original[f"{norm}.weight"]
        keep = before.abs() > 1e-2 * before.abs().max()  # channels the norm does not switch off
        s = before[keep] / norms[f"{norm}.weight"][keep]
        w = original[f"{consumer}.weight"][:, keep]
        q = linears[consumer].weight().dequantize()[:, keep]
        spread = (s.std() / s.mean()).item()
        with_s = ((q - w * s).norm() / (w * s).norm()).item()
        without = ((q - w).norm() / w.norm()).item()
        # measured: spread >= 0.12, with_s <= 0.03, without >= 0.18
        if not (spread > 0.05 and with_s < 0.05 and without > 5 * with_s):
            bad.append((norm, round(spread, 3), round(with_s, 4), round(without, 3)))
    assert not bad, bad


def test_reloads_with_inc_and_generates_with_kv_cache(int8_run, int8, tokenizer):
    from optimum.intel import INCModelForCausalLM

    inc = INCModelForCausalLM.from_pretrained(int8_run["out"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    out = inc.generate(
        ids, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=-1, return_dict_in_generate=True
    )
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
    assert (past.get_seq_length() if hasattr(past, "get_seq_length") else past[0][0].shape[-2]) == ids.shape[
        1
    ] + 3


def test_report_and_card(int8_run, report):
    out = int8_run["out"]
    for name in (
        "config.json",
        "pytorch_model.bin",
        "inc_config.json",
        "tokenizer.json",
        "README.md",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    from huggingface_hub import ModelCard

    c = ModelCard.load(out / "README.md")
    assert c.data.base_model == models.DEFAULT_MODEL_HUB_ID
    assert c.data.library_name and c.data.pipeline_tag == "text-generation"
    assert "smoothquant" in c.data.tags
    assert (
        f"{report['quality']['int8']['perplexity']:.2f}" in c.text
    )  # the measured numbers, not placeholders
    assert report["versions"]["neural-compressor"] == "3.7.1"
    assert report["speed"]["models"]["int8"]["median_ms"] > 0 and report["cpu"]["model"]
    # the project's bench and frontier measured this model (the embedded default): its card quotes them
    for measured in ("bench.json", "frontier.json"):
        assert json.loads((ROOT / "quantize" / "data" / measured).read_text())["command"] in c.text, measured


def measure(served, bf16, tokenizer, window: int = 128, prefill: int = 32) -> dict:
    """Perplexity ratio and top-1 agreement of a served INT8 model against BF16, measured here on the first 1024
    tokens of the held-out text, in windows of `window` read like a chat: the first `prefill` tokens as one
    prompt, then one token per forward pass with the cache (window = prefill: a long prompt in one pass)."""
    text = (ROOT / "quantize" / "data" / "heldout_eval.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :1024]
    nll_bf16 = nll_int8 = 0.0
    same = n = 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            x = ids[start : start + window + 1]
            ref = bf16(input_ids=x[None, :-1]).logits[0].float()  # teacher forcing in one pass
            cache, p = served.new_cache(len(x)), min(prefill, len(x) - 1)  # the last window may be shorter
            got = torch.cat(
                [served.forward(x[:p], cache, all_logits=True)]
                + [served.forward(x[t : t + 1], cache) for t in range(p, len(x) - 1)]
            )
            nll_bf16 += F.cross_entropy(ref, x[1:], reduction="sum").item()
            nll_int8 += F.cross_entropy(got, x[1:], reduction="sum").item()
            same += (got.argmax(-1) == ref.argmax(-1)).sum().item()
            n += len(x) - 1
    return {"perplexity_ratio": math.exp((nll_int8 - nll_bf16) / n), "top1_agreement": same / n, "tokens": n}


@pytest.fixture(scope="module")
def measured(int8_run, bf16, tokenizer) -> dict:
    """The INT8 model the app serves (the folder opened as the app opens it), measured by `measure`."""
    return measure(decoders.open_int8(int8_run["out"]), bf16, tokenizer)


def test_quality_bar(measured):
    assert measured["tokens"] == 1023
    assert measured["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO, measured
    assert measured["top1_agreement"] >= MIN_TOP1_AGREEMENT, measured


@pytest.fixture(scope="module")
def measured_long(int8_run, bf16, tokenizer) -> dict:
    """`measure` on prompts of 512 tokens, each prefilled in one pass, as a chat with history is."""
    return measure(decoders.open_int8(int8_run["out"]), bf16, tokenizer, window=512, prefill=512)


def test_quality_bar_on_a_long_prompt(measured_long, report):
    assert measured_long["tokens"] == 1023
    assert measured_long["perplexity_ratio"] <= LONG_MAX_PERPLEXITY_RATIO, measured_long
    assert measured_long["top1_agreement"] >= LONG_MIN_TOP1_AGREEMENT, measured_long
    q = report["quality"]["int8"]  # and the card's long-prompt numbers are these
    assert q["long_perplexity_ratio"] == pytest.approx(measured_long["perplexity_ratio"], abs=0.01), q
    assert q["long_top1_agreement"] == pytest.approx(measured_long["top1_agreement"], abs=0.01), q


def test_a_prompt_in_one_pass_gives_its_token_by_token_logits(int8_run, tokenizer):
    """512 tokens of held-out prose prefilled in one pass against the same tokens fed one at a time. Each token
    gets the same activation codes either way, but the attention sums in another order, and this model is chaotic
    under INT8 noise (see below), so the stated tolerance is statistical: the same argmax at >= 92% of positions,
    and 99% of positions within 10% of their logits' range. (Measured on an Intel Xeon with AMX: 96.7% and 7.0%;
    on an AMD EPYC with AVX-512 VNNI: 94.9% and 7.6%; with one scale per call 85.4% and 21.6%; BF16 itself 97.5%
    and 2.9%. The bars sit under both CPUs' figures with room for a third, and above the known fault's.)"""
    served = decoders.open_int8(int8_run["out"])
    ids = tokenizer(
        (ROOT / "quantize" / "data" / "heldout_eval.txt").read_text(), return_tensors="pt"
    ).input_ids
    ids = ids[0, :512]
    with torch.inference_mode():
        whole = served.forward(ids, served.new_cache(512), all_logits=True)
        cache = served.new_cache(512)
        steps = torch.cat([served.forward(ids[i : i + 1], cache) for i in range(len(ids))])
    same = (whole.argmax(-1) == steps.argmax(-1)).float().mean().item()
    rows = (whole - steps).abs().max(1).values / whole.abs().max(1).values
    assert same >= 0.92 and torch.quantile(rows, 0.99) <= 0.10, (same, torch.quantile(rows, 0.99))


# `measure` in a child whose FBGEMM is held to its AVX2 kernels (read once, at its first GEMM): CPUs without VNNI
AVX2_MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from test_quantize_e2e import measure
from quantize import models
from quantize.runtime import decoders
decoder = decoders.open_int8(sys.argv[1])
bf16, tokenizer = models.load_bf16(sys.argv[2]), models.load_tokenizer(sys.argv[2])
print(json.dumps({"decode": measure(decoder, bf16, tokenizer),
                  "long": measure(decoder, bf16, tokenizer, window=512, prefill=512), "served_by": decoder.label}))
"""


def test_quality_bar_on_cpus_without_vnni(int8_run, default_dir):
    """The same folder as the app serves it on an AVX2 CPU. (A CI machine without VNNI measured top-1 0.842 when
    every Linear ran 7-bit activations there.)"""
    import subprocess
    import sys

    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    child = [sys.executable, "-c", AVX2_MEASURE, str(int8_run["out"]), str(default_dir), str(ROOT / "tests")]
    got = json.loads(subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout)
    for mode in ("decode", "long"):
        assert got[mode]["tokens"] == 1023
        assert got[mode]["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO, got
        assert got[mode]["top1_agreement"] >= MIN_TOP1_AGREEMENT, got


def test_card_quotes_the_quality_measured_here(report, measured):
    """The card's quality numbers are the served model's: they agree with this independent measurement."""
    q = report["quality"]["int8"]
    assert q["perplexity_ratio"] == pytest.approx(measured["perplexity_ratio"], abs=0.01), (q, measured)
    assert q["top1_agreement"] == pytest.approx(measured["top1_agreement"], abs=0.01), (q, measured)


def test_card_measures_the_inc_loader_it_offers(int8_run, report, int8, bf16, tokenizer):
    """The card tells Optimum Intel users to load the folder with INCModelForCausalLM: its row is that loader's own
    numbers on the same text (measured here through it), and the card says whether they meet the bar."""
    row = report["quality"]["int8_inc"]
    got = {"decode": measure(HFDecoder(int8, "INC"), bf16, tokenizer),
           "long": measure(HFDecoder(int8, "INC"), bf16, tokenizer, window=512, prefill=512)}  # fmt: skip
    for mode, prefix in (("decode", ""), ("long", "long_")):
        assert row[f"{prefix}perplexity_ratio"] == pytest.approx(got[mode]["perplexity_ratio"], abs=0.01), (
            row,
            got,
        )
        assert row[f"{prefix}top1_agreement"] == pytest.approx(got[mode]["top1_agreement"], abs=0.01), (
            row,
            got,
        )
    meets = all(
        g["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO and g["top1_agreement"] >= MIN_TOP1_AGREEMENT
        for g in got.values()
    )
    card = (int8_run["out"] / "README.md").read_text()
    assert ("it meets the quality bar" if meets else "it **does not meet** the quality bar") in card


def test_card_measures_no_smoothquant_on_the_kernels_that_ship(int8_run, report, bf16, tokenizer, tmp_path):
    """The card's row for INT8 without SmoothQuant is the shipped recipe with nothing smoothed (the same kernels and
    tail: every Linear dynamic INT8), served as the INT8 one is: rebuilt here, written for the engine, measured by
    this file's own loop. (It used to keep down_proj and lm_head in BF16 while the shipped model runs them INT8,
    so the row that should show what smoothing buys compared different precisions.)"""
    import dataclasses

    from quantize import engine_file
    from quantize.maintainer import calibration, recipe
    from quantize.runtime import engine

    chats = calibration.calibration_ids(tokenizer, 48)
    shipped = recipe.RECIPES[report["recipe"]["name"]]
    unsmoothed = dataclasses.replace(shipped, smooth_quant=False, smooth_pairs=())
    base = recipe.quantize(bf16, chats, unsmoothed, tmp_path / "work")
    assert engine_file.write_engine_file(base.model, tmp_path)
    base.model.config.to_json_file(tmp_path / "config.json")
    got = measure(engine.load(tmp_path), bf16, tokenizer)
    row = report["quality"]["int8_no_sq"]
    assert row["perplexity_ratio"] == pytest.approx(got["perplexity_ratio"], abs=0.01), (row, got)
    assert row["top1_agreement"] == pytest.approx(got["top1_agreement"], abs=0.01), (row, got)
    card = (int8_run["out"] / "README.md").read_text()
    assert f"{row['perplexity']:.2f}" in card
    # and the card says in words which way it went, from the worse mode of each row
    int8 = report["quality"]["int8"]
    worse = {n: (max(m["perplexity_ratio"], m["long_perplexity_ratio"]), min(m["top1_agreement"],
             m["long_top1_agreement"])) for n, m in (("sq", int8), ("no_sq", row))}  # fmt: skip
    if worse["sq"][0] <= worse["no_sq"][0] and worse["sq"][1] >= worse["no_sq"][1]:
        assert "SmoothQuant helps this model" in card
    elif worse["sq"][0] >= worse["no_sq"][0] and worse["sq"][1] <= worse["no_sq"][1]:
        assert "SmoothQuant does not help this model" in card
    else:
        assert "SmoothQuant trades one measure for the other" in card


def test_pushed_in_one_commit(int8_run):
    """The repo the command pushed, read back through the Hub API of the local Hub server that received it."""
    from huggingface_hub import HfApi

    out = int8_run["out"]
    local = {
        p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
    }  # w8a8/ too
    repo = int8_run["repo"]
    with local_hub(_SESSION / "hub-int8") as hub:
        commits = [c.commit_id for c in HfApi(endpoint=hub.endpoint).list_repo_commits(repo)]
        # the repo's creation makes its first commit (a .gitattributes alone); the push is one commit on top
        assert len(commits) == 2, commits
        assert set(hub.files(repo, revision=commits[1])) == {".gitattributes"}
        pushed = hub.files(repo, revision=commits[0])
    pushed.pop(".gitattributes")
    assert sorted(pushed) == sorted(local)
    # compared file by file: a failing comparison of the whole folders' bytes would print hundreds of MB
    assert [name for name in local if pushed[name] != local[name]] == []
    assert re.search(rf"Pushed: \S*{commits[0]}", int8_run["stdout"])  # the command names the commit it made


def test_engine_serves_the_shipped_folder_as_inc_does(int8_run, int8, bf16, tokenizer):
    """The engine (what the app serves) in INC's activation precision against INCModelForCausalLM on the same
    folder. This model is chaotic under INT8 noise (1e-6 relative noise in one norm flips ~15% of argmaxes), so
    two implementations cannot match token for token: they must measure the same against BF16 (the config-built
    models in test_engine.py do match token for token)."""
    from quantize.maintainer import evaluate
    from quantize.runtime import engine

    ours = engine.load(int8_run["out"], reduce_range=True, weight_only_down=False)
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :1024]
    ref_nll, ref_top = evaluate.teacher_forced(HFDecoder(bf16, "BF16"), ids)
    got = {}
    # INC's dynamic Linears scale each call: fed one token per call they scale per token, as the engine does for
    # the 32 tokens it prefills in one pass
    for name, decoder, prefill in (("engine", ours, 32), ("inc", HFDecoder(int8, "INC"), 1)):
        nll, top = evaluate.teacher_forced(decoder, ids, prefill=prefill)
        got[name] = (nll - ref_nll, (top == ref_top).float().mean().item())
    assert abs(got["engine"][0] - got["inc"][0]) < 0.02, got  # log-perplexity ratio within 2%
    assert abs(got["engine"][1] - got["inc"][1]) < 0.04, got


def test_engine_load_never_builds_a_float_model(int8_run, bf16):
    """Peak memory while the engine loads the default INT8 folder, in a fresh process: far below the FP32 model
    INC's loader builds first (4 bytes per parameter)."""
    import subprocess
    import sys

    # VmHWM, reset first: a child's ru_maxrss starts at its parent's (this test process holds several models)
    code = (
        "import sys, torch, quantize.runtime.engine as e\n"
        "hwm = lambda: int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = hwm()\n"
        "m = e.load(sys.argv[1]); m.forward(torch.tensor([1, 2]), m.new_cache(4))\n"
        "print((hwm() - before) * 1024)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(int8_run["out"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fp32_bytes = 4 * sum(p.numel() for p in bf16.parameters())
    assert int(proc.stdout.split()[-1]) < 0.6 * fp32_bytes, (proc.stdout, fp32_bytes)
