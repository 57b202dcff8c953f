"""Tied input/output embeddings survive quantization: INC scales lm_head in place, which must not touch the
input embeddings (stack notes: top-1 agreement fell to ~1% when it did)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantize.maintainer import recipe


def tiny_tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def test_untie_gives_lm_head_its_own_copy():
    model = tiny_tied_llama()
    assert recipe.untie_embeddings(model)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert not model.config.tie_word_embeddings
    assert not recipe.untie_embeddings(model)  # idempotent


def test_quantizing_a_tied_model_keeps_input_embeddings(tmp_path):
    model = tiny_tied_llama()
    original = model.model.embed_tokens.weight.detach().clone()
    calib = [torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    res = recipe.quantize(model, calib, recipe.RECIPES[recipe.DEFAULT_RECIPE], tmp_path)

    # the caller's model is untouched (quantize works on a copy) ...
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, original)
    # ... and the quantized embeddings are the original ones up to INT8 rounding, not divided by smoothing scales
    emb = res.model.model.embed_tokens
    emb = getattr(emb, "module", emb)
    deq = emb.weight().dequantize() if callable(emb.weight) else emb.weight
    cos = torch.nn.functional.cosine_similarity(deq.float(), original.float(), dim=1)
    assert cos.min() > 0.99
    # and SmoothQuant did run: its folded scales divided every RMSNorm weight by per-channel factors
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            ratio = p.detach().float() / dict(res.model.named_parameters())[name].detach().float()
            assert ratio.std() > 1e-3 * ratio.abs().mean(), name
