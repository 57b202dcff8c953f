"""The engine (quantize/runtime/engine.py) against the documented loader, INCModelForCausalLM, on the same folder; its
cache, its activation paths on this CPU, and what it refuses to read."""

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_LLAMA, TINY_OPT
from transformers import AutoConfig, AutoModelForCausalLM

from quantize import engine_file, machine, models
from quantize.maintainer import calibration, recipe
from quantize.runtime import decoders, engine, kernels
from quantize.runtime.decoders import HFDecoder
from quantize.runtime.generate import Sampling, stream

# Random small models, one per family the engine serves (quantize/families.py); the default tokenizer's vocabulary.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {},  # q/k/v carry biases
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "gemma": {"head_dim": 16},  # (1 + weight) norms in FP32, GeGLU, a scaled embedding
    # and two more norms a block, soft-capped attention and logits, its own query scale (config defaults)
    "gemma2": {"head_dim": 16},
    "opt": {},  # LayerNorm with biases, learned positions, a ReLU MLP without a gate, model.decoder.*
    # ALiBi (each family's own slopes; 6 heads, not a power of two, where the two differ), fused q/k/v, GELU MLPs
    "bloom": {},  # q/k/v stored head by head, biases everywhere, a LayerNorm after the embedding
    "mpt": {},  # LayerNorms without bias, no biases at all
}
OWN_WORDS = {  # sized in their config's own words
    "opt": TINY_OPT,
    "bloom": {"hidden_size": 96, "n_layer": 2, "n_head": 6},
    "mpt": {"d_model": 96, "n_layers": 2, "n_heads": 6, "max_seq_len": 512},
}
# The norms INC folds SmoothQuant's scales into, where not every one of them, and what a norm multiplies by
# (offset + weight: Gemma's is 1 + weight); see test_families.py, FOLDS.
FOLDED = {"gemma": ("post_attention_layernorm",), "gemma2": ("input_layernorm", "pre_feedforward_layernorm"),
          "opt": ("self_attn_layer_norm", "final_layer_norm"), "bloom": ("input_layernorm", "post_attention_layernorm"),
          "mpt": ("norm_1", "norm_2")}  # fmt: skip
NORM_OFFSET = {"gemma": 1.0, "gemma2": 1.0}
FLOAT = {"gemma2": {"lm_head"}}  # transformers' Gemma 2 generate() reads lm_head.weight's dtype
TOKENS = 64


def build(tmp_path, tokenizer, family: str):
    """A random model of `family` saved as BF16, and its INT8 folder made by the default recipe."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        max_position_embeddings=512,
        **(OWN_WORDS.get(family, TINY_LLAMA) | FAMILIES[family]),
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    bf16_dir, int8_dir = tmp_path / "bf16", tmp_path / "int8"
    model.save_pretrained(bf16_dir)
    tokenizer.save_pretrained(bf16_dir)
    result = recipe.quantize(
        model,
        calibration.calibration_ids(tokenizer, 4),
        recipe.RECIPES[recipe.DEFAULT_RECIPE],
        tmp_path / "work",
    )
    assert_norms_rescaled(model, result.model, FOLDED.get(family), NORM_OFFSET.get(family, 0.0))
    recipe.save_int8(result, int8_dir, tokenizer, model)
    return model, bf16_dir, int8_dir


def norm_weights(model, only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The norms' weights: those named in `only`, or every one named *norm."""
    picked = (lambda n: any(f".{o}." in n for o in only)) if only else (lambda n: n.endswith("norm.weight"))
    return {n: p.detach().float() for n, p in model.named_parameters() if picked(n) and n.endswith(".weight")}


def assert_norms_rescaled(
    original, quantized, only: tuple[str, ...] | None = None, offset: float = 0.0
) -> None:
    """SmoothQuant ran: folding divided every RMSNorm's factor (offset + weight), or those named in `only`, by
    per-channel factors (seen in the weights)."""
    before, after = norm_weights(original, only), norm_weights(quantized, only)
    assert before.keys() == after.keys() and before
    for name, w in before.items():
        ratio = (offset + w) / (offset + after[name])
        assert ratio.std() > 1e-3 * ratio.abs().mean(), name  # per channel, not one factor for all


def int8_matrices(int8_dir) -> set[str]:
    """The Linears stored as s8 matrices in the engine's file, read from the file's own header."""
    import json
    import struct

    with open(int8_dir / engine_file.ENGINE_FILE, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {
        n.removesuffix(".qweight")
        for n, info in header.items()
        if n.endswith(".qweight") and info["dtype"] == "I8"
    }


def greedy(decoder, ids, n=TOKENS):
    return [s.token_id for s in stream(decoder, ids, Sampling(max_new_tokens=n))]


def follows_greedy(decoder, ids, tokens: list[int], tolerance: float) -> bool:
    """Whether each of `tokens` is `decoder`'s greedy choice after the prompt and the tokens before it, fed one
    token per call (INC's dynamic Linears then scale per token), within `tolerance` of the logits' largest
    magnitude. Not token equality: where two logits are that close, either kernel's rounding may pick (an AVX2
    BF16 head did on Gemma 2's random model)."""
    cache, fed = decoder.new_cache(), torch.cat([ids, torch.tensor(tokens[:-1], dtype=ids.dtype)])
    logits = torch.cat([decoder.forward(fed[i : i + 1], cache) for i in range(len(fed))])[len(ids) - 1 :]
    lead = logits.max(1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return bool((lead <= tolerance * logits.abs().max(1).values).all())


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """Each family's random model and INT8 folder, built once for the tests of this module that read them."""
    folders = {}

    def get(family: str):
        if family not in folders:
            folders[family] = build(tmp_path_factory.mktemp(family), tokenizer, family)
        return folders[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_matches_inc_on_config_models(built, tokenizer, family):
    model, bf16_dir, int8_dir = built(family)
    inc = HFDecoder(models.load_inc_int8(int8_dir), "INC")
    ours = engine.load(
        int8_dir, reduce_range=True, weight_only_down=False
    )  # INC's kernels: 7-bit activations
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # every Linear (lm_head too, but for Gemma 2's, which transformers reads as float) an INT8 matrix in the file
    assert int8_matrices(int8_dir) == linears - FLOAT.get(family, set())
    ids = torch.tensor(tokenizer("The engine and the documented loader read the same folder.").input_ids)
    a, b = ours.new_cache(256), inc.new_cache()
    # INC's dynamic Linears scale each call: fed a token at a time, they scale per token, as the engine's prompt
    inc_steps = torch.cat([inc.forward(ids[i : i + 1], b, all_logits=True) for i in range(len(ids))])
    logits = [(ours.forward(ids, a, all_logits=True), inc_steps)]
    for token in (5, 77, 1234):
        logits.append((ours.forward(torch.tensor([token]), a), inc.forward(torch.tensor([token]), b)))
    # stated tolerance: 1e-4 of the logits' range; two BF16 steps where the head is BF16 (Gemma 2's: its GEMM
    # over a prompt's rows and over one row round the BF16 outputs differently, up on one side and down on the
    # other: a CPU whose oneDNN is held to AVX2 measured 0.0027 on a range of 0.68, one step being 0.0026)
    tolerance = 2**-7 if "lm_head" in FLOAT.get(family, ()) else 1e-4
    for x, y in logits:
        assert (x - y).abs().max() <= tolerance * y.abs().max(), (family, (x - y).abs().max(), y.abs().max())
    assert follows_greedy(inc, ids, greedy(ours, ids), tolerance)
    # and the BF16 engine against transformers' own BF16 model
    bf16 = engine.load(bf16_dir)
    x, y = (
        bf16.forward(ids, bf16.new_cache(64), all_logits=True),
        HFDecoder(model, "hf").forward(ids, HFDecoder(model, "hf").new_cache(), all_logits=True),
    )
    assert (x - y).abs().max() <= 0.02 * y.abs().max()


@pytest.fixture(scope="module")
def tiny(built):
    return built("llama")


# One pass or token by token, the same numbers within: BF16's rounding of activations (its GEMMs round differently
# over a prompt's rows and over one row); INT8's FP32 sums, each token's codes being the same either way.
ONE_PASS_TOLERANCE = {"bf16": 0.02, "int8": 1e-4}


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_cache_is_written_in_place_and_equals_one_prefill(tiny, tokenizer, kind):
    _, bf16_dir, int8_dir = tiny
    e = engine.load(bf16_dir if kind == "bf16" else int8_dir)
    ids = torch.tensor(
        tokenizer("One pass or token by token: the same numbers, whatever the scale.").input_ids
    )
    whole = e.forward(ids, e.new_cache(64), all_logits=True)
    cache = e.new_cache(64)
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    steps = [e.forward(ids[:4], cache, all_logits=True)] + [
        e.forward(ids[i : i + 1], cache) for i in range(4, len(ids))
    ]
    assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr and cache.length == len(ids)
    assert (torch.cat(steps) - whole).abs().max() <= ONE_PASS_TOLERANCE[kind] * whole.abs().max()
    with pytest.raises(ValueError, match="positions"):
        e.forward(torch.arange(70), e.new_cache(64))


def decode_together(e, prompts: list[torch.Tensor], steps: int = 6) -> tuple[list, list]:
    """The prompts prefilled alone into slots of a pool, then decoded by `Engine.step` in a changing batch: the
    first two from the start, the third joining at step 2, the first leaving after step 3. Returns each sequence's logits (its prefill's, then
    one row a step it was in) and the greedy tokens it was fed."""
    pool = e.new_pool(5)
    slots = [pool.take(64) for _ in range(5)]  # slot 0 is another reply's, never in these steps
    e.forward(prompts[1], slots[2])
    pool.give_back(slots[2])  # slot 2 held a reply that ended: the batch's slots are not adjacent
    caches = [slots[3], slots[1], slots[4]]  # nor in the batch's order
    logits = [[e.forward(p, c)] for p, c in zip(prompts, caches)]
    fed = [[] for _ in prompts]
    for step in range(steps):
        live = [
            i for i, (joins, leaves) in enumerate([(0, 4), (0, steps), (2, steps)]) if joins <= step < leaves
        ]
        tokens = [int(logits[i][-1].argmax()) for i in live]
        rows = e.step(torch.tensor(tokens), [caches[i] for i in live])
        for row, i, token in zip(rows, live, tokens):
            logits[i].append(row[None])
            fed[i].append(token)
    return [torch.cat(x) for x in logits], fed


def decode_alone(e, prompt: torch.Tensor, fed: list[int]) -> torch.Tensor:
    cache = e.new_cache(64)
    return torch.cat([e.forward(prompt, cache)] + [e.forward(torch.tensor([t]), cache) for t in fed])


ONEDNN_SKIP = "this CPU has neither VNNI nor AMX: INT8 rows run on FBGEMM alone here (flags: {})"


NO_COMPILER = "no C++ compiler here: a batched engine's INT8 rows run eager"


def without_compiler(monkeypatch) -> None:
    """This process as one with no C++ compiler (inductor's own search is cached once per process)."""
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setattr(engine, "compiler", lambda: None)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-batched", "int8-batched-eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_batch_step_gives_each_sequence_its_own_logits(built, tokenizer, family, kind, monkeypatch):
    """Sequences of different lengths (so different positions: RoPE, learned, ALiBi) decoded in one batch, joining
    and leaving mid-way, against each decoded alone; the stated tolerance is the one-pass one (BF16 GEMMs round
    differently over several rows; INT8 rows are scaled one by one, each as a lone token). int8-batched: loaded
    with Q8CHAT_COMPILED_ROWS=1, every Linear's rows (prompts and batches) compiled (w8a8_rows); -eager: loaded as
    the app loads it by default (or asking for compiled rows without a C++ compiler), the rows on oneDNN (every
    Linear here: the size floor is lowered for these small models)."""
    if kind == "int8-batched":  # the compiled rows, asked for
        monkeypatch.setenv(kernels.COMPILED_ROWS, "1")
        if kernels.rows_kind(True, not kernels.full_range_activations()) != "compiled":
            pytest.skip(NO_COMPILER + " (or no VNNI for 8-bit codes)")
    if kind == "int8-batched-eager":
        without_compiler(monkeypatch)
        if not kernels.onednn_rows():
            pytest.skip(ONEDNN_SKIP.format(sorted(machine.cpu_flags())))
    monkeypatch.setattr(engine, "ONEDNN_ROWS_MIN_WEIGHTS", 0)
    _, bf16_dir, int8_dir = built(family)
    e = engine.load(bf16_dir if kind == "bf16" else int8_dir, batched=kind.startswith("int8-batched"))
    texts = ["A short one.", "A longer prompt, so that its positions run well past the others'.", "Hi"]
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    together, fed = decode_together(e, prompts)
    assert [len(f) for f in fed] == [4, 6, 4]
    # a weight-only down_proj (7-bit CPUs) takes BF16 activations: BF16's tolerance
    bf16_inside = kind == "bf16" or "int8 weight-only" in e.kinds.values()
    tolerance = ONE_PASS_TOLERANCE["bf16" if bf16_inside else "int8"]
    tolerance = tolerance if "lm_head" not in FLOAT.get(family, ()) else 2**-8
    for prompt, got, tokens in zip(prompts, together, fed):
        alone = decode_alone(e, prompt, tokens)
        assert (got - alone).abs().max() <= tolerance * alone.abs().max(), (family, (got - alone).abs().max())


# The compiled step against the eager one: inductor sums in its own order (FP32; BF16 rounds between ops in
# other places), so within the one-pass tolerances, not to the bit
COMPILED_TOLERANCE = {"bf16": 0.02, "int8": 1e-4}


# INT8 in every family; BF16 differs only in its Linears (opaque to the graph), so two families (RoPE, ALiBi)
@pytest.mark.parametrize(
    ("family", "kind"), [(f, "int8") for f in FAMILIES] + [("llama", "bf16"), ("bloom", "bf16")]
)
def test_compiled_steps_give_the_eager_engines_logits(built, tokenizer, family, kind):
    """Loaded compiled, a lone token runs as one compiled graph (the profiler sees the compiled region and every
    Linear as the opaque op inside it) over a pool's slot, and gives what the eager engine gives for the same
    tokens, position by position, across a growth of the pool (so another capacity, the same graph). So does a
    batched step, compiled too, over slots neither adjacent nor in order, rows joining and leaving. None of it,
    in grad or inference mode, on the first slot taken, or on a cache of its own, builds a graph the load did
    not (dynamo's count of the graphs it built)."""
    if not kernels.compiler():
        pytest.skip(NO_COMPILER)
    _, bf16_dir, int8_dir = built(family)
    folder = bf16_dir if kind == "bf16" else int8_dir
    eager, compiled = engine.load(folder), engine.load(folder, compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompt = torch.tensor(tokenizer("A prompt, and then its reply token by token.").input_ids)
    fed = [int(t) for t in torch.randint(5, 2000, (8,), generator=torch.Generator().manual_seed(1))]
    want = decode_alone(eager, prompt, fed)
    pool = compiled.new_pool(3)
    pool.take(8)  # slot 0 is another reply's: this one is slot 1, strided views of the pool
    cache = pool.take(len(prompt) + 4)
    got = [compiled.forward(prompt, cache)]
    with torch.profiler.profile() as profile:
        got += [compiled.forward(torch.tensor([t]), cache) for t in fed[:4]]
    pool.take(300)  # the pool grows: its capacity, so each layer's K and V, change shape
    with torch.inference_mode():  # as the app's scheduler calls it
        got += [compiled.forward(torch.tensor([t]), cache) for t in fed[4:]]
    names = [e.name for e in profile.events()]
    assert any(n.startswith("Torch-Compiled Region") for n in names), family
    linears = 4 * len(compiled.blocks) + 1  # each token's, at least (the profiler may list an op twice)
    assert names.count("q8chat::linear") >= 4 * linears, (family, names.count("q8chat::linear"))
    got = torch.cat(got)
    texts = ["A short one.", "A longer prompt, so that its positions run well past the others'.", "Hi"]
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    with torch.profiler.profile() as profile:  # a batched step, compiled: the same rows as eager's
        together, fed_together = decode_together(compiled, prompts)
    assert any(e.name.startswith("Torch-Compiled Region") for e in profile.events()), family
    with torch.inference_mode():  # a cache of its own, as generate.stream and the bench decode
        first = compiled.new_pool(1).take(8)  # and the first slot a pool gives
        for c in (compiled.new_cache(8), first):
            compiled.forward(prompt[:3], c), compiled.forward(prompt[3:4], c)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, family
    # a BF16 Linear inside (a weight-only down_proj on 7-bit CPUs, Gemma 2's head) rounds what inductor sums
    bf16_inside = kind == "bf16" or {"int8 weight-only", "bfloat16"} & set(eager.kinds.values())
    tolerance = COMPILED_TOLERANCE["bf16" if bf16_inside else "int8"]
    assert (got - want).abs().max() <= tolerance * want.abs().max(), (family, (got - want).abs().max())
    for prompt, got, tokens in zip(prompts, together, fed_together):  # the eager engine fed the same tokens
        want = decode_alone(eager, prompt, tokens)
        assert (got - want).abs().max() <= tolerance * want.abs().max(), (family, (got - want).abs().max())


def test_a_pool_grows_with_its_longest_conversation_and_its_caches_move_with_it(built, tokenizer):
    """A pool made for short replies takes one longer than it holds: the tensors grow, and the reply already in a
    slot goes on from what it had (its next step's logits are its own alone), beside the newcomer."""
    _, bf16_dir, _ = built("llama")
    e = engine.load(bf16_dir)
    pool, prompt = e.new_pool(2), torch.tensor(tokenizer("A short one.").input_ids)
    short = pool.take(len(prompt) + 2)
    token = int(e.forward(prompt, short).argmax())
    long = pool.take(e.max_len)  # more positions than the pool made room for
    long_prompt = torch.arange(300) % 200 + 5
    e.forward(long_prompt, long)
    rows = e.step(torch.tensor([token, 7]), [short, long])
    alone = decode_alone(e, prompt, [token])[-1]
    assert (rows[0] - alone).abs().max() <= ONE_PASS_TOLERANCE["bf16"] * alone.abs().max()
    with pytest.raises(ValueError, match="positions"):  # still the model's window at most
        e.forward(torch.arange(e.max_len - 300), long)


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_slot_given_back_returns_its_memory_to_the_os(default_dir):
    """A pool's slot costs no memory until its reply writes it; written whole, then given back, the process's
    resident memory drops by what it held, though the slot stays allocated for the next reply."""
    e = engine.load(default_dir)
    pool, before = e.new_pool(1), resident_bytes()
    cache = pool.take(e.max_len)
    held = cache.k.numel() * cache.k.element_size() * 2
    assert held > 150e6  # well above what the rest of the process moves meanwhile
    assert resident_bytes() - before < 0.1 * held, (resident_bytes() - before, held)
    cache.k.fill_(1.0), cache.v.fill_(1.0)  # as a long conversation writes it
    before = resident_bytes()
    pool.give_back(cache)
    assert before - resident_bytes() > 0.9 * held, (before - resident_bytes(), held)


@pytest.mark.parametrize("bias", [False, True])
def test_rows_on_onednn_give_fbgemms_numbers_exactly(bias):
    """oneDNN's GEMM of several rows (what a batched engine runs) sums the same codes as FBGEMM's: rows of every
    kind (wide, narrow, all positive, all zero), counts from a batch to a long prompt. Without a bias the outputs
    are FBGEMM's to the bit; with one, FBGEMM's float epilogue adds it in another order: stated tolerance 1e-5 of
    the outputs' range (measured: 5e-4 on outputs up to 400). A lone row stays on FBGEMM."""
    if not kernels.onednn_rows():
        pytest.skip(ONEDNN_SKIP.format(sorted(machine.cpu_flags())))
    torch.manual_seed(0)
    w = torch.randn(192, 320)
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    b = torch.randn(192) if bias else None
    fbgemm, onednn = (kernels.Int8Linear(q, scale, b, False, rows) for rows in ("fbgemm", "onednn"))
    for rows in (2, 8, 33, 70):
        x = torch.randn(rows, 320) * torch.logspace(-3, 1, rows)[:, None]
        x[0], x[1] = 0.0, x[1].abs()
        got, want = onednn(x), fbgemm(x)
        assert torch.equal(got, want) if b is None else (got - want).abs().max() <= 1e-5 * want.abs().max(), (
            rows
        )
    lone = torch.randn(1, 320)
    assert torch.equal(onednn(lone), fbgemm(lone))


@pytest.mark.parametrize("reduce_range", [True, False])
def test_compiled_rows_against_float64_from_the_same_codes(reduce_range):
    """The compiled INT8 Linear (w8a8_rows, through inductor's C++) at 1, 8, 64 and 512 rows whose ranges differ by
    10^4, wide and narrow, all positive, all zero: each row quantized on its own grid (asymmetric, 127 or 255
    steps), the integer sums rescaled per row, with a bias; against that computed here in float64. Stated
    tolerance: two code steps of the row times the largest weight (the codes are computed in FP32, so a value
    within ~1e-5 of a rounding tie may land one step over: 4-5 of 131,072 at 512 rows; FBGEMM's own rows do the
    same). One scale for all rows (the fault this guards) is off by > 10x that on the rows far below the largest."""
    if not kernels.compiler():
        pytest.skip(NO_COMPILER)
    if not reduce_range and not (kernels.full_range_activations() and kernels.onednn_rows()):
        pytest.skip("FBGEMM or oneDNN has no VNNI kernel here (the CPU's, or a cap on them): 7-bit only")
    torch.manual_seed(0)
    w, scale, q = int8_weights()
    bias = torch.randn(96)
    levels = 127 if reduce_range else 255
    compiled = kernels.Int8Linear(q, scale, bias, reduce_range, "compiled")
    for m in (1, 8, 64, 512):
        x = torch.randn(m, 256) * torch.logspace(-1, 3, m)[:, None]
        if m > 2:
            x[0], x[1], x[2] = 0.0, x[1].abs(), -x[2].abs()
        got = compiled(x).numpy()
        rows = [
            emulate_dynamic(r[None].numpy().astype(np.float64), q.numpy(), scale.numpy(), levels)
            if r.any()
            else np.zeros((1, 96))  # an all-zero row: the bias alone
            for r in x
        ]
        want = np.concatenate(rows) + bias.numpy()
        one_scale = (
            emulate_dynamic(x.numpy().astype(np.float64), q.numpy(), scale.numpy(), levels) + bias.numpy()
        )
        biggest_weight = (scale[:, None] * q.abs()).max().item()
        for i in range(m):
            lo, hi = min(x[i].min().item(), 0.0), max(x[i].max().item(), 0.0)
            two_steps = 2 * (hi - lo) / levels * biggest_weight
            error = np.abs(got[i] - want[i]).max()
            assert error <= two_steps, (m, i, error, two_steps)
            if m > 2 and 0 < i < m // 4:  # rows 10^3 and more below the largest: one scale would lose them
                assert np.abs(one_scale[i] - want[i]).max() > 10 * two_steps, (m, i)


NO_COMPILER_CHILD = """
import sys
import numpy as np
import torch
from quantize.runtime import engine
e = engine.load(sys.argv[1], batched=True)
print(e.label)
ids = torch.tensor([1, 5, 77, 1234, 9])
np.save(sys.argv[2], e.forward(ids, e.new_cache(16), all_logits=True).numpy())
"""


def test_without_a_compiler_the_engine_runs_eager_and_says_so(tiny, tmp_path, monkeypatch):
    """Compiled rows asked for and the compiled step left to its default, in a child whose PATH holds no C++
    compiler (and no $CXX): a batched INT8 engine loads, says "eager kernels (no C++ compiler)" in its label, and
    computes what this process's compiled engine computes."""
    _, _, int8_dir = tiny
    monkeypatch.setenv(kernels.COMPILED_ROWS, "1")  # asked for, in the child and here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    unset = ("CXX", kernels.COMPILED_STEP)  # the compiled step as a new user gets it: the default
    env = {k: v for k, v in os.environ.items() if k not in unset} | {
        "PATH": str(bin_dir),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", NO_COMPILER_CHILD, str(int8_dir), str(tmp_path / "eager.npy")],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "eager kernels (no C++ compiler)" in out.stdout, out.stdout + out.stderr[-2000:]
    here = engine.load(int8_dir, batched=True)
    want = here.forward(torch.tensor([1, 5, 77, 1234, 9]), here.new_cache(16), all_logits=True).numpy()
    got = np.load(tmp_path / "eager.npy")
    assert np.abs(got - want).max() <= ONE_PASS_TOLERANCE["int8"] * np.abs(want).max()


def int8_weights(out_features: int = 96, in_features: int = 256) -> tuple[torch.Tensor, ...]:
    """A random float weight, its per-output-channel scales and INT8 codes (symmetric, 127 steps)."""
    w = torch.randn(out_features, in_features)
    scale = w.abs().amax(1) / 127
    return w, scale, torch.round(w / scale[:, None]).to(torch.int8)


def emulate_dynamic(x: np.ndarray, q: np.ndarray, scale: np.ndarray, levels: int) -> np.ndarray:
    """Per-tensor asymmetric activation quantization with `levels` steps, integer GEMM, float rescale."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    s = (hi - lo) / levels
    zero = np.round(-lo / s)
    xq = np.clip(np.round(x / s) + zero, 0, levels)
    return ((xq - zero) @ q.T.astype(np.float64)) * s * scale


@pytest.mark.parametrize("reduce_range", [True, False])
def test_activation_paths(reduce_range):
    """7-bit activations everywhere; 8-bit only where the CPU has VNNI (else int16 sums would saturate)."""
    flags = machine.cpu_flags()
    if not reduce_range and "avx512_vnni" not in flags:
        pytest.skip(
            f"this CPU has no AVX-512 VNNI: the engine runs 7-bit activations here (flags: avx2="
            f"{'avx2' in flags})"
        )
    torch.manual_seed(0)
    w, scale, q = int8_weights()
    x = torch.randn(1, 256) * torch.linspace(0.1, 8, 256)
    got = kernels.Int8Linear(q, scale, None, reduce_range)(x).numpy()
    want = emulate_dynamic(
        x.numpy().astype(np.float64), q.numpy(), scale.numpy(), 127 if reduce_range else 255
    )
    other = emulate_dynamic(
        x.numpy().astype(np.float64), q.numpy(), scale.numpy(), 255 if reduce_range else 127
    )
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    assert np.abs(got - other).max() > 10 * np.abs(got - want).max()


@pytest.mark.parametrize("reduce_range", [True, False])
def test_each_row_gets_its_own_activation_scale(reduce_range):
    """Rows of a prompt whose ranges differ by 10^6: each is quantized on its own grid (asymmetric, 127 or 255
    steps), the integer sums rescaled per row; against that computed here in float64 from the same INT8 codes."""
    if not reduce_range and not kernels.full_range_activations():
        pytest.skip("FBGEMM runs no VNNI kernel here (the CPU's or FBGEMM_ENABLE_INSTRUCTIONS): 7-bit only")
    torch.manual_seed(0)
    w, scale, q = int8_weights()
    bias = torch.randn(96)
    x = torch.randn(7, 256) * torch.logspace(-2, 4, 7)[:, None]  # (ATen raises a step below 6.1e-5)
    x[1] = x[1].abs()  # a row with no negative value: its zero point is 0
    x[2] = -x[2].abs()  # and one with no positive value
    levels = 127 if reduce_range else 255
    got = kernels.Int8Linear(q, scale, bias, reduce_range)(x).numpy()
    rows = [emulate_dynamic(r[None].numpy().astype(np.float64), q.numpy(), scale.numpy(), levels) for r in x]
    want = np.concatenate(rows) + bias.numpy()
    one_scale = emulate_dynamic(x.numpy().astype(np.float64), q.numpy(), scale.numpy(), levels) + bias.numpy()
    for i in range(len(x)):
        error = np.abs(got[i] - want[i]).max()
        assert error < 1e-4 * np.abs(want[i]).max(), (i, error)
        assert (
            np.abs(one_scale[i] - want[i]).max() > 100 * error or i == len(x) - 1
        )  # the largest row sets it


def test_engine_picks_activation_bits_from_cpu_flags(tiny, monkeypatch):
    monkeypatch.delenv(kernels.FBGEMM_ISA, raising=False)  # the flags decide, not a cap on FBGEMM's kernels
    assert kernels.full_range_activations({"avx2", "avx512f", "avx512_vnni"})
    assert not kernels.full_range_activations({"avx2", "fma"})
    assert not kernels.full_range_activations({"avx2", "avx512f"})  # AVX-512 without VNNI: vpmaddubsw
    served = engine.load(tiny[2])
    vnni = "avx512_vnni" in machine.cpu_flags()
    assert served.reduce_range is not vnni
    assert ("8-bit" if vnni else "7-bit") in served.label


# Run in a child whose FBGEMM is held to its AVX2 kernels (FBGEMM reads the switch once, at its first GEMM): the
# CPUs without VNNI that CI and Spaces also land on.
AVX2_CHILD = """
import sys
import numpy as np
import torch
from quantize.runtime import engine, kernels
q = torch.full((8, 64), 127, dtype=torch.int8)
x = torch.ones(1, 64); x[0, 0] = 0  # u8 codes of 255: two 255 * 127 products overflow int16
full = kernels.Int8Linear(q, torch.full((8,), 1 / 127), None, reduce_range=False)(x)
tiny = engine.load(sys.argv[1])
ids = torch.tensor([1, 5, 77, 1234, 9])
np.save(sys.argv[2], full[0].numpy())
np.save(sys.argv[3], tiny.forward(ids, tiny.new_cache(16), all_logits=True).numpy())
cache = tiny.new_cache(16)
np.save(sys.argv[4], torch.cat([tiny.forward(ids[i : i + 1], cache) for i in range(len(ids))]).numpy())
"""


def test_cpus_without_vnni_get_7_bit_activations_and_weight_only_down_proj(tiny, tmp_path):
    """In FBGEMM's AVX2 kernels full-range activations saturate (the sum is not 63 * 127 * (255/255)); the
    engine there serves what 7-bit activations with a weight-only down_proj compute, not the 8-bit model."""
    import subprocess
    import sys

    sums, logits, steps = tmp_path / "sums.npy", tmp_path / "logits.npy", tmp_path / "steps.npy"
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    child = [sys.executable, "-c", AVX2_CHILD, str(tiny[2]), str(sums), str(logits), str(steps)]
    subprocess.run(child, env=env, check=True)
    assert np.abs(np.load(sums) - 63.0).max() > 10  # 63 ones times weight 1.0 each, had it not saturated
    ids = torch.tensor([1, 5, 77, 1234, 9])
    got = torch.from_numpy(np.load(logits))
    # the prompt in one pass there gives what its tokens give one by one (each row scaled on its own)
    assert (torch.from_numpy(np.load(steps)) - got).abs().max() <= ONE_PASS_TOLERANCE[
        "int8"
    ] * got.abs().max()

    def here(**how):
        e = engine.load(tiny[2], **how)
        return e.forward(ids, e.new_cache(16), all_logits=True)

    seven = here(reduce_range=True, weight_only_down=True)
    assert (got - seven).abs().max() < 1e-4 * seven.abs().max()
    for other in (
        here(reduce_range=False, weight_only_down=False),
        here(reduce_range=True, weight_only_down=False),
    ):
        assert (got - other).abs().max() > 1e-3 * seven.abs().max()


def test_weight_only_kernel_keeps_an_outlier_channel():
    """down_proj's input has outlier channels: INT8 weights with BF16 activations keep them, 7-bit codes do not."""
    torch.manual_seed(0)
    w, scale, q = int8_weights()
    x = torch.randn(4, 256)
    x[:, 7] *= 80
    exact = x.double() @ (q.double() * scale.double()[:, None]).T

    def error(y: torch.Tensor) -> float:
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    weight_only = error(kernels.WeightOnlyInt8Linear(q, scale, None)(x))
    assert weight_only < 0.01  # BF16 activations: 8 significant bits per value, not per tensor
    assert weight_only < error(kernels.Int8Linear(q, scale, None, reduce_range=True)(x)) / 3


def test_fp16_gemm_keeps_the_bf16_values():
    """On CPUs without oneDNN's BF16 path the BF16 side runs FBGEMM's fp16 GEMM: its weights keep their BF16 values,
    far beyond fp16's own range
    (here up to 3e5, where fp16 overflows, and down to 1e-7 of that). Against the same BF16 weights multiplied in
    double precision, the error is FP32 accumulation's, not a 16-bit rounding of the weights."""
    torch.manual_seed(0)
    w = (torch.randn(64, 512) * torch.logspace(-2, 5.5, 512)).bfloat16()  # columns from 1e-2 to 3e5
    w[:, :8] = (
        torch.randn(64, 8).mul(3e-2).bfloat16()
    )  # and some below fp16's smallest normal after scaling up
    bias = torch.randn(64).bfloat16()
    x = torch.randn(3, 512).bfloat16()
    exact = x.double() @ w.double().T + bias.double()
    got = kernels.Fp16GemmBf16Linear(w, bias)(x.float()).double()
    assert torch.isfinite(got).all()
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-6
    assert not torch.isfinite(
        x.float() @ w.half().float().T
    ).all()  # what an fp16 copy of these weights gives


BF16_CHILD = """
import sys
import numpy as np
import torch
from quantize.runtime import engine
e = engine.load(sys.argv[1])
print(e.label)
np.save(sys.argv[2], e.forward(torch.tensor([1, 5, 77, 1234, 9]), e.new_cache(16), all_logits=True).numpy())
"""


def test_both_bf16_kernels_compute_the_bf16_model(tiny, tmp_path):
    """The BF16 side picks its kernel from the CPU: oneDNN's prepacked BF16 matmul here, FBGEMM's fp16 GEMM in a
    child whose oneDNN is held to AVX2 (no BF16 path, as on AVX2-only machines); both give transformers' BF16
    model within the BF16 engine's tolerance (bf16 activations: 2% of the logits' range)."""
    import subprocess
    import sys

    model = AutoModelForCausalLM.from_pretrained(tiny[1], torch_dtype=torch.bfloat16).eval()
    ids = torch.tensor([1, 5, 77, 1234, 9])
    hf = HFDecoder(model, "hf")
    ref = hf.forward(ids, hf.new_cache(), all_logits=True)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    child = subprocess.run([sys.executable, "-c", BF16_CHILD, str(tiny[1]), str(tmp_path / "l.npy")], env=env,
                           check=True, capture_output=True, text=True)  # fmt: skip
    here = engine.load(tiny[1])
    got = {"here": here.forward(ids, here.new_cache(16), all_logits=True),
           "avx2": torch.from_numpy(np.load(tmp_path / "l.npy"))}  # fmt: skip
    assert "fp16" in child.stdout  # the fallback really ran
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # and a CPU with oneDNN's BF16 path runs that here
        assert "oneDNN" in here.label
    for logits in got.values():
        assert (logits - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8_folder_is_served_without_unpickling(tiny, tmp_path, tokenizer):
    """The app loads engine.safetensors; the pickle INC reads is never opened (here it would leave a mark)."""
    _, _, int8_dir = tiny
    folder = tmp_path / "int8"
    shutil.copytree(int8_dir, folder)
    mark = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(mark), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    served = decoders.open_int8(folder)
    ids = torch.tensor(tokenizer("Hello").input_ids)
    assert greedy(served, ids, 4) == greedy(engine.load(int8_dir), ids, 4)
    assert not mark.exists()


def test_engine_file_is_safetensors_with_int8_weights(tiny):
    _, _, int8_dir = tiny
    from safetensors import safe_open

    with safe_open(str(int8_dir / engine_file.ENGINE_FILE), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["format"] == engine_file.FORMAT
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert q.dtype == torch.int8 and q.shape == (TINY_LLAMA["hidden_size"], TINY_LLAMA["hidden_size"])
    assert "lm_head.qweight" in names and "model.embed_tokens.qweight" in names
    assert not any(n.endswith("q_proj.weight") for n in names)


def test_a_checkpoint_saved_from_the_base_model_is_read(tmp_path, tokenizer):
    """OPT's checkpoints on the Hub name their tensors decoder.layers.0… (saved from OPTModel, no `model.`), which
    transformers' loader accepts: the engine reads such a folder as the same model."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", vocab_size=len(tokenizer), **TINY_OPT)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "full")
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    tensors = load_file(bare / "model.safetensors")
    assert all(n.startswith("model.") for n in tensors)  # tied: lm_head is not stored
    save_file(
        {n.removeprefix("model."): t for n, t in tensors.items()},
        bare / "model.safetensors",
        {"format": "pt"},
    )
    loaded = AutoModelForCausalLM.from_pretrained(bare, torch_dtype=torch.bfloat16)  # transformers reads it
    assert torch.equal(loaded.model.decoder.layers[0].fc1.weight, model.model.decoder.layers[0].fc1.weight)
    ids = torch.tensor(tokenizer("Saved from the base model.").input_ids)
    got = [engine.load(d) for d in (tmp_path / "full", bare)]
    x, y = (e.forward(ids, e.new_cache(32), all_logits=True) for e in got)
    assert torch.equal(x, y)
