"""The quality measure's bookkeeping: which model is the reference, and how many models it holds at once."""

import weakref

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quantize.maintainer import evaluate
from quantize.runtime.decoders import HFDecoder

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip


def test_models_are_opened_one_at_a_time_reference_first(tokenizer):
    """A 7B BF16 model and its INT8 copy do not fit a 24 GB machine together: the measure lets each model go
    before it opens the next."""
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **TINY)
    opened: list[tuple[str, weakref.ref]] = []

    def opener(name: str, seed: int):
        def open_model():
            held = [n for n, ref in opened if ref() is not None]
            assert not held, f"{held} still held when {name} is opened"
            torch.manual_seed(seed)
            model = HFDecoder(AutoModelForCausalLM.from_config(config).eval(), name)
            opened.append((name, weakref.ref(model)))
            return model

        return open_model

    openers = {"a": opener("a", 0), "ref": opener("ref", 1), "c": opener("c", 2)}
    out = evaluate.compare(openers, "ref", tokenizer, max_tokens=80, greedy_tokens=4)
    assert [n for n, _ in opened] == ["ref", "a", "c"]
    assert all(ref() is None for _, ref in opened)
    m = out["models"]
    assert m["ref"]["top1_agreement"] == 1.0 and m["ref"]["perplexity_ratio"] == 1.0
    # two random models agree with a third far less than it agrees with itself
    assert m["a"]["top1_agreement"] < 0.9 and m["c"]["long_top1_agreement"] < 0.9
