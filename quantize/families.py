"""Every model family Q8-Chat runs and quantizes, one row each (FAMILIES): the one place a family is described.

A row says how transformers 4.45 names and computes the family's decoder, which is all the engine needs to run it
(runtime/engine.py), and what the recipe needs to smooth it (maintainer/recipe.py): the Linears by role, found from the
same names, the pairs it may smooth itself, how its norms are shown to Neural Compressor. The block path, the BF16
reference and the bench's random models read the same rows. A block is
x += post_attn(o(attention(norm_attn(x)))); x += post_mlp(down(act(gate) * up)(norm_mlp(x))).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# The recipe's roles of Linears: qkv and gate_up follow a norm, so Neural Compressor absorbs SmoothQuant's scales into
# it; o_proj, down_proj and lm_head have no norm in front that it pairs them with (the recipe's `tail` decides).
ROLES = ("qkv", "gate_up", "o_proj", "down_proj", "lm_head")
# The pairs the recipe smooths itself, role -> (producer, consumer): lm_head after the final norm, down_proj after
# up_proj (its input is act(gate) * up, or relu(fc1)), o_proj after v_proj (softmax-weighted rows of v).
PAIRS = ("lm_head", "down_proj", "o_proj")


def standard_words(size: dict) -> dict:
    return size


@dataclass(frozen=True)
class Family:
    """One architecture (a transformers model_type). Names of modules are those transformers 4.45 gives them."""

    # ---- the decoder, as the engine reads it
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # one name: fused
    o: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # one name: fused, gate's rows first
    down: str = "mlp.down_proj"
    norms: tuple[str, str] = (
        "input_layernorm",
        "post_attention_layernorm",
    )  # before attention, before the MLP
    post_norms: tuple[str, str] | None = None  # on the attention's and the MLP's outputs (Gemma 2)
    # Gemma's norms scale by (1 + weight) in FP32, then cast; Llama's by weight in the activations' dtype
    norm_offset: float = 0.0
    norm_in_fp32: bool = False
    activation: tuple[str | None, str] = ("hidden_act", "silu")  # the config key naming it, and its default
    scale_embedding: bool = False  # Gemma: the embedding times sqrt(hidden_size), in the activations' dtype
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layer_norm: bool = False  # LayerNorm with its bias (OPT), else RMSNorm
    eps: tuple[str | None, float] = ("rms_norm_eps", 1e-6)  # the config key naming it, and its default
    gated: bool = True  # the MLP is down(act(gate) * up); else down(act(up)) (OPT's fc1, fc2)
    positions: str | None = None  # a learned table added to the embedding (OPT's), instead of RoPE
    position_offset: int = 0  # the table row of position 0
    alibi: Callable[[int], torch.Tensor] | None = (
        None  # per-head slopes of ALiBi (BLOOM, MPT), instead of RoPE
    )
    embed_norm: str | None = None  # a LayerNorm right after the embedding (BLOOM's)
    qkv_by_head: bool = False  # one fused q/k/v Linear stored head by head, [q k v] of each (BLOOM's)
    max_len: str = "max_position_embeddings"  # the config key of the longest sequence
    fits: Callable[[dict], bool] = lambda config: True  # the configs of the family the row describes
    # ---- SmoothQuant, as the recipe applies it
    # Neural Compressor finds and scales norms by class name: it knows LlamaRMSNorm and LayerNorm, so a norm that
    # computes what LlamaRMSNorm does is shown to it as one (with weight + norm_offset, given back after)
    norm_class: str = "LlamaRMSNorm"
    shown_as: str | None = None  # the class INC is shown instead, or None when INC knows norm_class
    smoothed: tuple[str, ...] = PAIRS  # the PAIRS this family has (fused or non-linear ones it has not)
    # roles transformers itself reads as float weights, so they stay BF16 whatever the recipe says (Gemma 2's
    # generate() takes its mask dtype from lm_head.weight)
    float_roles: tuple[str, ...] = ()
    # ---- the bench's random models: a standard shape (hidden, MLP, layers, heads, KV heads) in its config's words
    words: Callable[[dict], dict] = standard_words


def linear_names(family: Family, role: str) -> tuple[str, ...]:
    """The names of a role's Linears inside a block (lm_head: the model's own name)."""
    return {"qkv": family.qkv, "gate_up": family.gate_up, "o_proj": (family.o,), "down_proj": (family.down,),
            "lm_head": (family.lm_head,)}[role]  # fmt: skip


def linear_regex(family: Family, role: str) -> str:
    """A regex of the role's module names in the whole model (INC names some ops "<name>.module")."""
    names = "|".join(re.escape(n) for n in linear_names(family, role))
    return (names if role == "lm_head" else rf".*\.({names})") + r"(\.module)?"


def pair(family: Family, role: str) -> tuple[str, str]:
    """The (producer, consumer) module names of a smoothed pair; "{i}" stands for a block's index."""
    block = f"{family.layers}.{{i}}."
    return {"lm_head": (family.final_norm, family.lm_head),
            "down_proj": (block + family.gate_up[-1], block + family.down),
            "o_proj": (block + family.qkv[-1], block + family.o)}[role]  # fmt: skip


# ---------------------------------------------------------------- what differs between families


def bloom_slopes(heads: int) -> torch.Tensor:
    """ALiBi's slopes as transformers' BLOOM builds them: 2^(-8i/n) for the largest power of two n <= heads, then
    every other slope of 2n for the heads beyond it."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    return torch.tensor(slopes + [2 ** (-4 * i / n) for i in range(1, 2 * (heads - n), 2)])


def mpt_slopes(heads: int, bias_max: int = 8) -> torch.Tensor:
    """ALiBi's slopes as transformers' MPT builds them (which differ from BLOOM's when heads is not a power of
    two): 2^(-bias_max i/n) for the power of two n >= heads, the odd ones first, the first `heads` of them."""
    n = 2 ** math.ceil(math.log2(heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1).float() * (bias_max / n))
    return slopes if n == heads else torch.cat([slopes[1::2], slopes[::2]])[:heads]


def bloom_fits(c: dict) -> bool:
    """Pre-norm residuals, and the attention's output not split into tensor-parallel slices."""
    sliced = c.get("pretraining_tp", 1) > 1 and c.get("slow_but_exact")
    return not c.get("apply_residual_connection_post_layernorm") and not sliced


def mpt_fits(c: dict) -> bool:
    """MPT as transformers 4.45 runs it: ALiBi with its default bias_max (transformers ignores another one),
    the standard query scale, no clipping or norms of q and k."""
    a = c.get("attn_config") or {}
    return (
        a.get("alibi", True)
        and a.get("alibi_bias_max", 8) == 8
        and not (a.get("softmax_scale") or a.get("clip_qkv") or a.get("qk_ln"))
    )


def opt_fits(c: dict) -> bool:
    """Pre-norm OPT without the 350M model's projections around the blocks (its post-norm blocks, too)."""
    return (
        c.get("do_layer_norm_before", True)
        and c.get("word_embed_proj_dim") in (None, c["hidden_size"])
        and not c.get("_remove_final_layer_norm")
    )


def gemma_words(size: dict) -> dict:
    """Gemma's head size and query scale are config keys of their own."""
    head_dim = size["hidden_size"] // size["num_attention_heads"]
    return size | {"head_dim": head_dim, "query_pre_attn_scalar": head_dim}


def opt_words(size: dict) -> dict:
    """OPT has no GQA (one KV head per query head) and calls its MLP width ffn_dim."""
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    return {k: size[k] for k in keep} | {"ffn_dim": size["intermediate_size"], "word_embed_proj_dim": size["hidden_size"]}  # fmt: skip


def own_words(model_type: str) -> Callable[[dict], dict]:
    """BLOOM and MPT in their own config words (MPT's d_model for hidden_size), without GQA and with transformers'
    fixed MLP of 4 x hidden."""

    def words(size: dict) -> dict:
        from transformers import AutoConfig

        names = AutoConfig.for_model(model_type).attribute_map
        return {names.get(k, k): size[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}

    return words


# ---------------------------------------------------------------- the table

LLAMA = Family()
RMS_SHOWN = replace(LLAMA, shown_as="LlamaRMSNorm")  # an RMSNorm INC does not know, computing LlamaRMSNorm's
GEMMA = replace(RMS_SHOWN, norm_class="GemmaRMSNorm", norm_offset=1.0, norm_in_fp32=True, scale_embedding=True,
                activation=("hidden_activation", "gelu_pytorch_tanh"), words=gemma_words)  # fmt: skip
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": replace(RMS_SHOWN, norm_class="MistralRMSNorm"),
    "qwen2": replace(RMS_SHOWN, norm_class="Qwen2RMSNorm"),  # q/k/v biases are read from the weights
    # Phi-3 fuses q/k/v and gate/up: INC absorbs into the norms in front of them; the producers of o_proj's and
    # down_proj's inputs are slices of those fused Linears, so only the final norm -> lm_head pair is smoothed here
    "phi3": replace(RMS_SHOWN, norm_class="Phi3RMSNorm", qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",),
                    smoothed=("lm_head",)),
    "gemma": GEMMA,
    "gemma2": replace(GEMMA, norm_class="Gemma2RMSNorm", norms=("input_layernorm", "pre_feedforward_layernorm"),
                      post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), float_roles=("lm_head",)),
    # OPT: fc2 reads relu(fc1(x)), and relu(x / s) = relu(x) / s for s > 0, so fc1's rows take fc2's scales
    "opt": Family(o="self_attn.out_proj", gate_up=("fc1",), down="fc2", gated=False,
                  norms=("self_attn_layer_norm", "final_layer_norm"), layer_norm=True, eps=(None, 1e-5),
                  activation=("activation_function", "relu"), layers="model.decoder.layers",
                  embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm",
                  positions="model.decoder.embed_positions", position_offset=2, fits=opt_fits,
                  norm_class="LayerNorm", words=opt_words),
    # BLOOM fuses q/k/v per head and puts GELU before dense_4h_to_h (not scale-invariant): only the final norm ->
    # lm_head pair is smoothed here
    "bloom": Family(qkv=("self_attention.query_key_value",), o="self_attention.dense", gate_up=("mlp.dense_h_to_4h",),
                    down="mlp.dense_4h_to_h", gated=False, layer_norm=True, eps=("layer_norm_epsilon", 1e-5),
                    activation=(None, "gelu_pytorch_tanh"), layers="transformer.h",
                    embed="transformer.word_embeddings", final_norm="transformer.ln_f", alibi=bloom_slopes,
                    embed_norm="transformer.word_embeddings_layernorm", qkv_by_head=True, fits=bloom_fits,
                    norm_class="LayerNorm", smoothed=("lm_head",), words=own_words("bloom")),
    # MPT as transformers has it: LayerNorm without bias, fused Wqkv, GELU before down_proj
    "mpt": Family(qkv=("attn.Wqkv",), o="attn.out_proj", gate_up=("ffn.up_proj",), down="ffn.down_proj",
                  gated=False, norms=("norm_1", "norm_2"), layer_norm=True, eps=("layer_norm_epsilon", 1e-5),
                  activation=(None, "gelu"), layers="transformer.blocks", embed="transformer.wte",
                  final_norm="transformer.norm_f", alibi=mpt_slopes, max_len="max_seq_len", fits=mpt_fits,
                  norm_class="LayerNorm", smoothed=("lm_head",), words=own_words("mpt")),
}  # fmt: skip
# Families INC cannot smooth as transformers builds them, and why (one sentence each; the command stops with it).
NOT_SMOOTHABLE = {
    "gpt_neox": "with GPT-NeoX's parallel attention and MLP, the model Neural Compressor smooths no longer "
    "computes the original (a tiny one's INT8 logits correlated 0.61 with FP32, against over 0.99 for the "
    "families it takes)",
}
