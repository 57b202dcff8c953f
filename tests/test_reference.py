"""The BF16 reference run block by block (quantize/maintainer/reference.py), which verifies a block-built model: transformers'
whole model's numbers, in the memory of one block."""

import types

import pytest
import torch
from test_blockwise import DEEP, FAMILIES, build_bf16, peak_since_reset, reset_peak

from quantize import models
from quantize.maintainer import blockwise, evaluate, pipeline, recipe, reference
from quantize.runtime.decoders import HFDecoder

# What "the same" means. Teacher-forced windows: one pass of the same modules on the same weights, but the whole
# model runs with a KV cache and ByBlock without, which at some lengths rounds BF16 attention differently: on the
# default model 512-token windows were bit-identical and 128-token ones agreed on 98.8% of argmaxes.
# So log-likelihood to 1e-4 relative and argmaxes all but near-ties (2%). Greedy answers: the prompts run as one
# left-padded batch, which rounds BF16 differently from one prompt at a time; on the default model 6 of 8 answers
# were the same over 48 tokens and the other two parted after 5 and 12.
NLL_RTOL = 1e-4
TOP1_SAME = 0.98
# Random weights give flat logits, so more near-ties: config-built Gemma 2 parted on 12 of 599 argmaxes (2.0%).
TOP1_SAME_RANDOM = 0.975
ANSWERS_SAME = 5  # of 8
FIRST_TOKENS_SAME = 4


def windows_match(
    ours: reference.ByBlock, whole: HFDecoder, ids: torch.Tensor, top1_same: float = TOP1_SAME
) -> None:
    for window in (evaluate.WINDOW, evaluate.LONG_WINDOW):
        nll, top = evaluate.teacher_forced(whole, ids, window, window)  # the whole model, a window per pass
        got_nll, got_top = ours.teacher_forced(ids, window)
        assert got_nll == pytest.approx(nll, rel=NLL_RTOL), window
        assert (got_top == top).float().mean().item() >= top1_same, window


def test_by_block_measures_what_the_whole_default_model_does(default_dir, bf16, tokenizer):
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :1024]
    ours, whole = reference.ByBlock(default_dir), HFDecoder(bf16, "whole")
    windows_match(ours, whole, ids)
    prompts = [evaluate.prompt_ids(tokenizer, p) for p in evaluate.heldout_prompts()]
    eos = tokenizer.eos_token_id
    got = ours.greedy_answers(prompts, 24, eos)
    expected = [evaluate.greedy(whole, p, 24, eos) for p in prompts]
    assert sum(a == b for a, b in zip(got, expected)) >= ANSWERS_SAME, (got, expected)
    assert all(a[:FIRST_TOKENS_SAME] == b[:FIRST_TOKENS_SAME] for a, b in zip(got, expected))


@pytest.mark.parametrize("family", sorted(FAMILIES))  # the families built block by block
def test_by_block_matches_the_whole_model_of_each_family(tmp_path, tokenizer, family):
    whole = HFDecoder(build_bf16(tmp_path, tokenizer, family), "whole")
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :600]
    ours = reference.ByBlock(tmp_path)
    windows_match(ours, whole, ids, TOP1_SAME_RANDOM)
    # the prompts as one left-padded batch, positions counted from each prompt's first token (OPT: from the mask)
    prompts = [evaluate.prompt_ids(tokenizer, p) for p in evaluate.heldout_prompts()[:3]]
    got = ours.greedy_answers(prompts, 4, None)
    assert [a[:1] for a in got] == [evaluate.greedy(whole, p, 1, None) for p in prompts]


def test_by_block_soft_caps_gemma2s_logits(tmp_path, tokenizer):
    """Gemma 2 caps its logits after lm_head. A random model's logits are about 0.2, where the default cap of 30
    changes nothing, so the cap here is 0.5, which bends them; the logits must be transformers' own."""
    model = build_bf16(tmp_path, tokenizer, "gemma2", final_logit_softcapping=0.5)
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits[0].float()
    ours = reference.ByBlock(tmp_path)
    (hidden,) = ours.final_hidden([{"input_ids": ids, "use_cache": False}])
    # transformers caps in BF16, ByBlock in FP32: measured up to 0.0078 (a BF16 step below 1 is 2^-8 or less);
    # without the cap, 0.30
    torch.testing.assert_close(ours.logits(hidden[0]), expected, atol=2**-6, rtol=0)


def test_memory_is_one_block_not_the_model(tmp_path, tokenizer):
    """The peak while measuring a 32-block model is the 4-block one's: each block's memory-mapped BF16 goes with it.
    Holding the blocks would add 28 blocks' BF16 (28 x 18 MB) to the deep run."""
    model = build_bf16(tmp_path / "deep", tokenizer, "llama", **DEEP)
    block = 2 * sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n)
    whole = 2 * sum(p.numel() for p in model.parameters())
    del model
    build_bf16(tmp_path / "shallow", tokenizer, "llama", **(DEEP | {"num_hidden_layers": 4}))
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :600]
    prompts = [evaluate.prompt_ids(tokenizer, p) for p in evaluate.heldout_prompts()[:2]]
    grown = {}
    for name in ("shallow", "deep", "shallow"):  # the first shallow run warms imports and allocator
        before = reset_peak()
        ours = reference.ByBlock(tmp_path / name)
        ours.teacher_forced(ids, evaluate.LONG_WINDOW)
        ours.greedy_answers(prompts, 4, None)
        del ours
        grown[name] = peak_since_reset() - before
    held = {k: v / 2**20 for k, v in grown.items()} | {"block": block / 2**20, "whole": whole / 2**20}
    assert 28 * block > whole / 2  # holding the 28 extra blocks would show
    # Against the 4-block run, not the model: each run also holds its logits (about 0.4 GB at this vocabulary,
    # whatever the depth), which would hide a held model from an absolute bar.
    assert grown["deep"] - grown["shallow"] < 4 * block, held


def test_a_block_built_model_is_verified_block_by_block(tmp_path, tokenizer, monkeypatch):
    """The quality stages' reference for a model `python -m quantize` builds block by block; INC's whole-model
    path, which holds the BF16 model already, keeps it."""
    build_bf16(tmp_path, tokenizer, "llama")
    rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
    build = types.SimpleNamespace(source=tmp_path, model_type="llama", recipe=rec)
    assert not blockwise.takes(tmp_path, "llama", rec)  # a tiny model: the whole-model path
    build.shared_or_new_bf16 = lambda: models.load_bf16(tmp_path)
    assert isinstance(pipeline.bf16_reference(build)(), HFDecoder)
    monkeypatch.setattr(blockwise, "WHOLE_MODEL_MAX_PARAMS", 0)  # as a model above the threshold is
    assert isinstance(pipeline.bf16_reference(build)(), reference.ByBlock)
