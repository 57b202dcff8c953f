"""Block-by-block quantization (quantize/maintainer/blockwise.py) against INC's whole-model path, on config-built models of
each family the engine serves: the same smoothing and the same INT8 weights; bounded memory; a killed run that
resumes into the same folder; shards; a refusal before the work when the machine cannot hold it."""

import ctypes
import gc
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_LLAMA, TINY_OPT, wait_for
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from quantize import engine_file
from quantize.errors import ModelError
from quantize.maintainer import blockwise, calibration, export, recipe
from quantize.runtime import decoders, engine

pytestmark = pytest.mark.slow  # INC runs, a block at a time

FAMILIES = {"llama": {}, "mistral": {"sliding_window": 4096}, "qwen2": {}, "phi3": {},  # qwen2: q/k/v biases
            "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16}, "opt": {}, "bloom": {}, "mpt": {}}  # fmt: skip
OWN_WORDS = {"opt": TINY_OPT, "bloom": {"hidden_size": 64, "n_layer": 3, "n_head": 4},  # in their config's own words
             "mpt": {"d_model": 64, "n_layers": 3, "n_heads": 4, "max_seq_len": 512}}  # fmt: skip
# The norms SmoothQuant rescales in each block, and what a norm multiplies by (offset + weight: Gemma's is 1 +
# weight). INC absorbs Gemma's attention norm nowhere (whole model or block), so only its MLP norm moves.
SMOOTHED = {
    "gemma": ("post_attention_layernorm",),
    "gemma2": ("input_layernorm", "pre_feedforward_layernorm"),
    "opt": ("self_attn_layer_norm", "final_layer_norm"),
    "bloom": ("input_layernorm", "post_attention_layernorm"),
    "mpt": ("norm_1", "norm_2"),
}
OFFSET = {"gemma": 1.0, "gemma2": 1.0}
# What "the same" means. Scales and norms: FP32 rounding (the whole path computes later blocks' inputs through
# earlier blocks already smoothed, which is exact only in real arithmetic; measured up to 2e-5): 1e-4 relative. INT8 codes: a value that
# rounding puts on the other side of .5 moves by one code: at most 1, in at most 0.5% of a matrix. A Linear kept
# BF16 (Gemma 2's lm_head), likewise: one BF16 step (2^-7 relative at most), in at most 0.5% of it.
SCALE_RTOL = 1e-4
CODES_FLIPPED = 0.005
BF16_STEP = 2**-7
# Gemma 2's lm_head: BF16 on the whole path (transformers' Gemma 2 generate() reads its weight as float), INT8 on the
# block path, whose folder only the engine loads. The same smoothed weight either way: the INT8 one within half a
# step of its row's scale of the BF16 one (plus BF16's own rounding).
HEAD_INT8_ON_BLOCKS = {"gemma2"}


def assert_head_is_the_bf16_head_in_int8(whole: dict, blocks: dict) -> None:
    w = whole.pop("lm_head.weight").float()
    q, scale = blocks.pop("lm_head.qweight"), blocks.pop("lm_head.scale")[:, None]
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert ((q.float() * scale - w).abs() <= scale * 0.5 * 1.001 + w.abs() * BF16_STEP).all()


def build_bf16(folder, tokenizer, family: str, **size):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), tie_word_embeddings=False, max_position_embeddings=512,
        **(OWN_WORDS.get(family, TINY_LLAMA) | {"num_hidden_layers": 3} | size), **FAMILIES[family],
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def both_paths(tmp_path, tokenizer, family: str):
    """The same BF16 model quantized by INC whole and block by block, with the default recipe."""
    model = build_bf16(tmp_path / "bf16", tokenizer, family)
    calib = calibration.calibration_ids(tokenizer, 4)
    rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
    whole = recipe.quantize(model, calib, rec, tmp_path / "inc-work")
    recipe.save_int8(whole, tmp_path / "whole", tokenizer, model)
    summary = blockwise.quantize_by_block(tmp_path / "bf16", calib, rec, tmp_path / "work", tmp_path / "blocks", tokenizer)  # fmt: skip
    return tmp_path / "whole", tmp_path / "blocks", summary


def tensors_of(folder) -> dict[str, torch.Tensor]:
    t = engine_file.Tensors(engine_file.safetensors_files(folder))
    return {name: t.get(name).clone() for name in t.where}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_path_gives_the_whole_models_int8(tmp_path, tokenizer, family):
    whole_dir, blocks_dir, summary = both_paths(tmp_path, tokenizer, family)
    whole, blocks = tensors_of(whole_dir), tensors_of(blocks_dir)
    if family in HEAD_INT8_ON_BLOCKS:
        assert_head_is_the_bf16_head_in_int8(whole, blocks)
    assert whole.keys() == blocks.keys()
    for name, w in whole.items():
        b = blocks[name]
        assert b.dtype == w.dtype and b.shape == w.shape, name
        if w.dtype == torch.int8:  # a Linear's INT8 codes
            moved = (w.int() - b.int()).abs()
            assert moved.max() <= 1 and (moved > 0).float().mean() <= CODES_FLIPPED, name
        elif w.dtype == torch.bfloat16:  # a Linear kept float
            torch.testing.assert_close(b, w, rtol=BF16_STEP, atol=0, msg=lambda m, name=name: f"{name}: {m}")
            assert (b != w).float().mean() <= CODES_FLIPPED, name
        else:  # scales, zero points, norms (where INC's and the recipe's smoothing ends up)
            torch.testing.assert_close(
                b, w, rtol=SCALE_RTOL, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}"
            )
    # SmoothQuant ran in each block: every norm of the block path is the BF16 norm over non-constant factors
    original = tensors_of(tmp_path / "bf16")
    smoothed = SMOOTHED.get(family, ("input_layernorm", "post_attention_layernorm"))
    in_a_block = re.compile(
        r"\.\d+\.[^.]+\.weight$"
    )  # model.layers.0.input_layernorm.weight, transformer.h.0.…
    norms = [n for n in blocks if in_a_block.search(n) and n.split(".")[-2] in smoothed]
    assert len(norms) == len(smoothed) * 3  # in each of the 3 blocks
    for name in norms:
        s = (OFFSET.get(family, 0.0) + original[name].float()) / (OFFSET.get(family, 0.0) + blocks[name])
        assert s.std() / s.mean() > 0.01, name
    # and the two folders compute the same: logits of a held-out-like prompt through the engine
    ids = tokenizer("The block path and the whole path must agree.", return_tensors="pt").input_ids[0]
    got = [decoders.open_int8(d) for d in (whole_dir, blocks_dir)]
    logits = [m.forward(ids, m.new_cache(64), all_logits=True) for m in got]
    assert torch.corrcoef(torch.stack([x.flatten() for x in logits]))[0, 1] > 0.999
    assert type(got[1]).__name__ == "Engine" and not list(blocks_dir.glob("*.bin"))  # served with no pickle


def peak_since_reset() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))


def reset_peak() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current resident set
    return peak_since_reset()


# Blocks big enough that the model in FP32 (about 1.3 GB) dwarfs what one block needs, and deep enough that
# keeping something of every block shows.
DEEP = {"hidden_size": 512, "intermediate_size": 5632, "num_hidden_layers": 32, "num_attention_heads": 8,
        "num_key_value_heads": 4}  # fmt: skip


def test_memory_stays_near_one_block_not_the_model(tmp_path, tokenizer):
    model = build_bf16(tmp_path / "bf16", tokenizer, "llama", **DEEP)
    params = {n: p.numel() for n, p in model.named_parameters()}
    del model
    block = 4 * sum(v for n, v in params.items() if ".layers.0." in n)
    ends = 4 * max(params["model.embed_tokens.weight"], params["lm_head.weight"])
    whole = 4 * sum(params.values())
    build_bf16(tmp_path / "shallow", tokenizer, "llama", **(DEEP | {"num_hidden_layers": 4}))
    calib = calibration.calibration_ids(tokenizer, 4)
    rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
    # warm: imports and INC's first-run state are not what is measured
    build_bf16(tmp_path / "warm", tokenizer, "llama")
    blockwise.quantize_by_block(tmp_path / "warm", calib, rec, tmp_path / "w0", tmp_path / "o0", tokenizer)
    grown = {}
    for name in ("shallow", "bf16"):  # 4 blocks, then 32
        before = reset_peak()
        blockwise.quantize_by_block(tmp_path / name, calib, rec, tmp_path / f"w-{name}", tmp_path / f"o-{name}", tokenizer)  # fmt: skip
        grown[name] = peak_since_reset() - before
    int8 = sum(f.stat().st_size for f in (tmp_path / "o-bf16").glob("engine*.safetensors"))
    # the embedding or lm_head in FP32 with its INT8 copy, a few copies of one block inside INC, the INT8 result
    bound = 2 * ends + 4 * block + int8 + 64 * 2**20
    assert bound < whole  # a path that holds the FP32 model can not pass
    assert grown["bf16"] < bound, (
        f"peak grew {grown['bf16'] / 2**20:.0f} MB; bound {bound / 2**20:.0f}, model in FP32 {whole / 2**20:.0f}"
    )
    # and the peak does not grow with depth: 28 more blocks may not keep half of their INT8 weights (a run that
    # quantized the skeleton's own blocks kept every block's packed INT8: 11.3 GB at 7B)
    int8_block = block // 4
    assert grown["bf16"] - grown["shallow"] < 14 * int8_block, {k: v / 2**20 for k, v in grown.items()}


RUN = """
import sys
from pathlib import Path
from quantize import models
from quantize.maintainer import blockwise, calibration, export, recipe
src, work, out = map(Path, sys.argv[1:4])
tok = models.load_tokenizer(src)
rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
blockwise.quantize_by_block(src, calibration.calibration_ids(tok, 4), rec, work, out, tok)
"""


def run_blocks(src, work, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(src), str(work), str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def test_a_killed_run_resumes_from_its_last_block_into_the_same_folder(tmp_path, tokenizer):
    build_bf16(tmp_path / "bf16", tokenizer, "llama", num_hidden_layers=6)
    assert run_blocks(tmp_path / "bf16", tmp_path / "w-once", tmp_path / "once").wait(600) == 0
    work = tmp_path / "w-killed"
    proc = run_blocks(tmp_path / "bf16", work, tmp_path / "resumed")
    third = work / "block-00002.safetensors"
    wait_for(lambda: third.is_file() or proc.poll() is not None, 600, "the third block")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resumed").exists()  # killed before the folder was written
    first = work / "block-00000.safetensors"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    assert run_blocks(tmp_path / "bf16", work, tmp_path / "resumed").wait(600) == 0
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # the finished block was not done again
    once, resumed = tensors_of(tmp_path / "once"), tensors_of(tmp_path / "resumed")
    assert once.keys() == resumed.keys()
    assert all(torch.equal(once[n], resumed[n]) for n in once)


class Killed(Exception):
    """Where a kill lands: the process stops there, with what it wrote so far on disk."""


def test_a_run_killed_just_before_it_records_a_block_resumes_with_that_blocks_own_inputs(
    tmp_path, tokenizer, monkeypatch
):
    """The narrowest point a kill can land: block 2's tensors and outputs written, progress.json not yet. The rerun
    redoes block 2 from block 2's inputs (not from the outputs it had already written) and gives the same folder."""
    from quantize import files

    build_bf16(tmp_path / "bf16", tokenizer, "llama", num_hidden_layers=4)
    calib, rec = calibration.calibration_ids(tokenizer, 4), recipe.RECIPES[recipe.DEFAULT_RECIPE]
    blockwise.quantize_by_block(
        tmp_path / "bf16", calib, rec, tmp_path / "w-once", tmp_path / "once", tokenizer
    )
    write_file = files.write_file

    def killed_at_block_2(path, data):
        if Path(path).name == "progress.json" and json.loads(data)["next"] == 3:
            raise Killed
        write_file(path, data)

    monkeypatch.setattr(files, "write_file", killed_at_block_2)
    with pytest.raises(Killed):
        blockwise.quantize_by_block(
            tmp_path / "bf16", calib, rec, tmp_path / "w", tmp_path / "resumed", tokenizer
        )
    monkeypatch.setattr(files, "write_file", write_file)
    assert json.loads((tmp_path / "w" / "progress.json").read_text())["next"] == 2
    blockwise.quantize_by_block(
        tmp_path / "bf16", calib, rec, tmp_path / "w", tmp_path / "resumed", tokenizer
    )
    once, resumed = tensors_of(tmp_path / "once"), tensors_of(tmp_path / "resumed")
    assert once.keys() == resumed.keys()
    assert [n for n in once if not torch.equal(once[n], resumed[n])] == []


def test_a_large_model_is_written_in_shards_the_engine_reads(tmp_path, tokenizer, monkeypatch):
    build_bf16(tmp_path / "bf16", tokenizer, "qwen2")
    calib = calibration.calibration_ids(tokenizer, 2)
    rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
    blockwise.quantize_by_block(tmp_path / "bf16", calib, rec, tmp_path / "work", tmp_path / "one", tokenizer)
    monkeypatch.setattr(blockwise, "SHARD_BYTES", 4 * 2**20)  # the 7 MB model in shards of 4 MB
    blockwise.write_folder(
        blockwise.Source.open(tmp_path / "bf16"), tmp_path / "work", tmp_path / "shards", tokenizer
    )
    shards = sorted(p.name for p in (tmp_path / "shards").glob("engine-*.safetensors"))
    assert len(shards) >= 2 and not (tmp_path / "shards" / "engine.safetensors").exists()
    index = __import__("json").loads((tmp_path / "shards" / engine_file.ENGINE_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    ids = torch.tensor([1, 2, 3, 4])
    a, b = (engine.load(tmp_path / d) for d in ("one", "shards"))
    assert torch.equal(a.forward(ids, a.new_cache(8)), b.forward(ids, b.new_cache(8)))
    # its compressed-tensors export is sharded too, with the single file's tensors
    whole, sharded = (export.write_export(tmp_path / d) for d in ("one", "shards"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    parts = {n: t for f in names for n, t in load_file(sharded / f).items()}
    single = load_file(whole / "model.safetensors")
    assert len(names) >= 2 and parts.keys() == single.keys() == index["weight_map"].keys()
    assert [n for n in single if not torch.equal(parts[n], single[n])] == []


def test_too_little_memory_or_disk_is_refused_before_the_work(tmp_path, tokenizer):
    build_bf16(tmp_path / "bf16", tokenizer, "llama")
    source = blockwise.Source.open(tmp_path / "bf16")
    plan = blockwise.plan(source, calibration.calibration_ids(tokenizer, 2))
    with pytest.raises(ModelError, match=r"needs about [\d.]+ GB of memory; 0.0 GB are available"):
        blockwise.check_room(plan, tmp_path / "out", available_ram=1)
    big = blockwise.Plan(plan.blocks, plan.block_fp32_bytes, plan.ends_fp32_bytes, 10**15, plan.hidden_bytes)
    with pytest.raises(ModelError, match=r"GB free under .* while it is written"):
        blockwise.check_room(big, tmp_path / "out", available_ram=2**40)
    assert not (tmp_path / "out").exists()
