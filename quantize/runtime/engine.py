"""The engine: decoding of the Llama-like families (llama, mistral, qwen2, phi3, gemma, gemma2), OPT, BLOOM and
MPT, INT8 or BF16, in one lean loop: one sequence (`Engine.forward`) or a batch of them (`Engine.step`).

The app, the benchmark and the quality check run both models through this engine (`forward` for one sequence,
`step` for the scheduler's batches over a `Pool` of cache slots), so INT8 and BF16 share the cache, the attention,
the fusions and the glue, and the speed-up the panel shows is quantization's alone. The Linears' kernels live in
runtime/kernels.py, the file format (reader and writer) in quantize/engine_file.py.
What differs is the Linear: `Int8Linear` (FBGEMM dynamic INT8, one activation scale per token) or
a float one (BF16: `OneDnnBf16Linear`, or `Fp16GemmBf16Linear` on CPUs without oneDNN's BF16 path; an INT8
folder's FP32 tail: `FloatLinear`); on CPUs without VNNI, down_proj runs `WeightOnlyInt8Linear`.
How the families differ is data, one row each (quantize/families.py): tensor names, fused Linears,
norms (RMSNorm or LayerNorm), activation, gated MLP or not, RoPE, learned positions or ALiBi, embedding scale;
what a config says (GQA, RoPE variant, head size, soft-capping, the query scale) is read from it.

Lean means:
  * weights are read from safetensors straight into their kernels: INT8 matrices into FBGEMM's packed format,
    the input embedding memory-mapped (a token gathers one row; the rest stays on disk), no model object is
    built, and freed load temporaries go back to the OS (`malloc_trim`);
  * a preallocated KV cache written in place, GQA attention without repeating K/V heads, RoPE tables built
    once, q/k/v fused into one GEMM and gate/up into another (each group shares its input, so one activation
    scale: the same numbers as three or two calls).
Where a C++ compiler is found (unless Q8CHAT_COMPILED_STEP=0), the decode step, `tokens` (a lone token or a batch),
runs as compiled graphs (`compile_tokens`), the Linears opaque ops inside them (kernels.Kernel).
Anything else (other architectures, static-INT8 recipes) runs on the generic path, `decoders.HFDecoder`.
"""

from __future__ import annotations

import json
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantize.engine_file import FORMAT, Tensors, safetensors_files
from quantize.families import FAMILIES, LLAMA, Family
from quantize.machine import malloc_trim, release_pages, settled_rss
from quantize.runtime.kernels import (
    COMPILED_ROWS,
    ONEDNN_ROWS_MIN_WEIGHTS,
    ROWS_LABEL,
    FloatLinear,
    Int8Linear,
    Linear,
    WeightOnlyInt8Linear,
    bf16_linear,
    compiler,
    full_range_activations,
    rows_kind,
    step_wanted,
    use_project_cache,
)


def in_engine_words(config: dict) -> dict:
    """The config with transformers' standard names beside a family's own (MPT's n_heads is
    num_attention_heads), from the family's config class itself."""
    from transformers import AutoConfig

    words = AutoConfig.for_model(config["model_type"]).attribute_map
    return {
        **config,
        **{std: config[own] for std, own in words.items() if own in config and std not in config},
    }


class Embedding:
    """Token rows of a table that is only gathered: memory-mapped from the file, so resident memory grows with
    the rows used. INC stores it weight-only INT8 (u8 per row, float scale and zero point); a BF16 model as is."""

    def __init__(self, tensors: Tensors, name: str) -> None:
        self.quantized = f"{name}.qweight" in tensors
        if self.quantized:
            self.q, self.scale, self.zero = (
                tensors.get(f"{name}.{k}") for k in ("qweight", "scale", "zero_point")
            )
        else:
            self.weight = tensors.get(f"{name}.weight")
        self.nbytes = sum(
            t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor)
        )

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self.weight[ids]
        return (self.q[ids].float() - self.zero[ids, None]) * self.scale[ids, None]


# ---------------------------------------------------------------- the model


@dataclass
class Norm:
    """RMSNorm (see rms_norm), or LayerNorm with its bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    layer: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer:  # statistics in FP32 inside torch, as transformers' nn.LayerNorm
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return rms_norm(x, self.weight, self.eps)


@dataclass
class Block:
    attn_norm: Norm
    qkv: Linear
    o: Linear
    mlp_norm: Norm
    gate_up: Linear
    down: Linear
    post_attn_norm: Norm | None = None
    post_mlp_norm: Norm | None = None


class Cache:
    """K and V of every layer for one conversation, written in place: [layers, kv_heads, max_len, head_dim]; a
    slot of a `Pool` (`pool`, `slot`) when it is one of the scheduler's, so a batched step attends to all its
    sequences at once."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pool: Pool | None = None, slot: int = 0) -> None:
        self.k, self.v, self.pool, self.slot = k, v, pool, slot
        self.length = 0


class Pool:
    """The caches of a scheduler's slots in one tensor each for K and V, [layers, slots, kv_heads, capacity,
    head_dim], so one attention call per layer reads every sequence of a batched step (`Engine.step`): a layer's
    slots are one strided batch for the matmuls, where slot-major tensors made them copy K and V every step. The
    capacity follows the longest conversation taken (powers of two, up to the model's window); pages become
    resident only as positions are written, and a slot given back returns its pages to the OS.

    A batched step reads every row's slot as far as the longest row's position (masked past its own): the
    memory there must hold finite numbers, since a masked NaN still spoils the softmax's product with V. So the
    tensors start as zeros, given back pages read as zeros, and the model writes only finite K and V.

    Slot 0 is never taken (its pages are never touched): so no slot's view starts at the tensor's first element.
    A compiled step takes where a view starts as a symbol, and dynamo builds another graph for a start of 0."""

    FIRST_CAPACITY = 256

    def __init__(self, slots: int, layers: int, kv_heads: int, head_dim: int, max_len: int, dtype) -> None:
        self.shape, self.max_len, self.dtype = (layers, slots + 1, kv_heads, 0, head_dim), max_len, dtype
        self.k = self.v = torch.empty(0, dtype=dtype)
        self.free, self.taken = list(range(1, slots + 1)), {}

    def take(self, positions: int) -> Cache:
        """A free slot's cache with room for `positions` (the window at most: forward says what is past it)."""
        if not self.free:
            raise RuntimeError("every slot of this pool is taken")
        self.grow(positions)
        slot = self.free.pop(self.free.index(min(self.free)))  # low slots first: a batch spans few
        self.taken[slot] = cache = Cache(self.k[:, slot], self.v[:, slot], self, slot)
        return cache

    def give_back(self, cache: Cache) -> None:
        """The slot is free again; its written pages go back to the OS (they read as zeros if touched again)."""
        del self.taken[cache.slot]
        self.free.append(cache.slot)
        for layer in (*cache.k, *cache.v):
            release_pages(layer)
        cache.k = cache.v = None

    def grow(self, positions: int) -> None:
        """New tensors with room for `positions` if these have none; the taken caches move into them as they
        are."""
        capacity = max(self.FIRST_CAPACITY, 1 << max(positions - 1, 1).bit_length())
        capacity = min(capacity, self.max_len)
        if self.k.dim() == 5 and capacity <= self.k.shape[3]:
            return
        shape = (*self.shape[:3], capacity, self.shape[4])
        k, v = untouched_zeros(shape, self.dtype), untouched_zeros(shape, self.dtype)
        for slot, cache in self.taken.items():
            k[:, slot, :, : cache.length] = cache.k[:, :, : cache.length]
            v[:, slot, :, : cache.length] = cache.v[:, :, : cache.length]
            cache.k, cache.v = k[:, slot], v[:, slot]
        self.k, self.v = k, v


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages stay untouched until written: calloc (numpy's zeros) maps fresh pages for a large block,
    which the OS hands out zeroed, where torch.zeros writes every one (and so makes it all resident)."""
    raw = np.zeros(math.prod(shape) * torch.empty(0, dtype=dtype).element_size(), dtype=np.uint8)
    with torch.inference_mode(False):  # a cache is an ordinary tensor whoever asks (see inference)
        return torch.from_numpy(raw).view(dtype).view(shape)


# A prompt runs in passes of at most PREFILL_CHUNK tokens, each padded to a multiple of PREFILL_STEP (one_pass).
# oneDNN keeps memory for every row count its BF16 matmul has run (about 3 MB per count for the default model's
# BF16 Linears; half of it stays even with its primitive cache off), so an app that met every prompt length grew
# without bound (+2.2 MB a reply in test_eight_concurrent_sessions); this way it meets at most
# PREFILL_CHUNK / PREFILL_STEP counts (measured: a plateau at 104 MB with a step of 16, so ~50 MB at 32). INT8 and
# BF16 run the same passes.
PREFILL_CHUNK, PREFILL_STEP = 512, 32


class Engine:
    """One model of a family in FAMILIES (quantize/families.py); `forward(ids, cache)` runs a prompt or a token and returns logits."""

    def __init__(
        self,
        config: dict,
        tensors: Tensors,
        label: str,
        reduce_range: bool,
        weight_only_down: bool = False,
        rows: str = "fbgemm",
        compiled: bool = False,
    ) -> None:
        config = in_engine_words(config)
        self.config, self.label = config, label
        self.arch = arch = FAMILIES[config["model_type"]]
        int8 = tensors.metadata.get("format") == FORMAT
        self.dtype = torch.float32 if int8 else torch.bfloat16  # the activations INC's INT8 model runs in
        self.read_config(config)
        self.reduce_range = reduce_range
        read = _Reader(tensors, self.dtype, reduce_range, weight_only_down, arch, self.eps, rows)
        rope = not (arch.positions or arch.alibi)
        rotated = self.heads + self.kv_heads if rope else 0
        self.blocks = [
            read.block(f"{arch.layers}.{i}", self.head_dim, rotated)
            for i in range(config["num_hidden_layers"])
        ]
        self.norm = read.norm(arch.final_norm)
        tied = "lm_head.weight" not in tensors and "lm_head.qweight" not in tensors
        self.lm_head = read.linear([arch.embed if tied else arch.lm_head])
        self.bytes_per_token = read.nbytes  # what one decode step streams
        # A tied table is the output matrix, read whole every token (packed for it); the input side gathers its
        # rows from the memory-mapped file, so it costs resident memory only for the rows used. So does a table
        # of learned positions.
        self.embed = Embedding(tensors, arch.embed)
        self.embed_norm = read.norm(arch.embed_norm) if arch.embed_norm else None
        self.positions = Embedding(tensors, arch.positions) if arch.positions else None
        self.weight_bytes = read.nbytes + (0 if tied else self.embed.nbytes)
        self.kinds = read.kinds
        # each position's rotation as complex numbers, made once: rope() is then one complex product
        self.rotation = torch.complex(*rope_tables(config, self.max_len, self.head_dim)) if rope else None
        # ALiBi: key j's score gets slope * j (softmax cancels the query's own -slope * i)
        self.alibi = (
            torch.outer(arch.alibi(self.heads), torch.arange(self.max_len).float()) if arch.alibi else None
        )
        self.compiled, self.marking, self.compile_bytes = None, False, 0
        if compiled:  # what the compiler keeps (its graphs, code, guards) is not the model's: measured apart
            before = settled_rss()
            compile_tokens(self)
            self.compile_bytes = max(settled_rss() - before, 0)
        malloc_trim()

    def read_config(self, config: dict) -> None:
        """What the config says beside the weights: heads, head size, norm eps, activation, the query scale,
        soft-capping, the embedding scale and the window."""
        from transformers.activations import ACT2FN

        arch = self.arch
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = config.get(arch.eps[0]) or arch.eps[1]
        self.act = ACT2FN[config.get(arch.activation[0]) or arch.activation[1]]
        self.scale = (config.get("query_pre_attn_scalar") or self.head_dim) ** -0.5
        self.attn_cap, self.logit_cap = (
            config.get("attn_logit_softcapping"),
            config.get("final_logit_softcapping"),
        )
        # as Gemma: the factor rounded to the activations' dtype first
        self.embed_scale = (
            torch.tensor(config["hidden_size"] ** 0.5, dtype=self.dtype) if arch.scale_embedding else None
        )
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        # the cache never outgrows the window, so no layer ever slides (Gemma 2 slides on every other one)
        self.max_len = min(config.get(arch.max_len) or 4096, window or 1 << 30)

    @property
    def position_bytes(self) -> int:
        """What one position of a cache takes: K and V of every layer."""
        return 2 * len(self.blocks) * self.kv_heads * self.head_dim * self.dtype.itemsize

    def new_cache(self, max_len: int | None = None) -> Cache:
        n = min(max_len or self.max_len, self.max_len)
        # torch.empty does not touch the pages: memory becomes resident only as positions are written. An ordinary
        # tensor whoever asks (see inference), one layer longer and that one never touched, as a Pool's slot 0.
        with torch.inference_mode(False):
            k, v = (torch.empty(len(self.blocks) + 1, self.kv_heads, n, self.head_dim, dtype=self.dtype)[1:]
                    for _ in "kv")  # fmt: skip
            return Cache(k, v)

    def new_pool(self, slots: int) -> Pool:
        """Caches for a scheduler's `slots`, which `step` attends to in one call per layer."""
        return Pool(slots, len(self.blocks), self.kv_heads, self.head_dim, self.max_len, self.dtype)

    def forward(self, ids: torch.Tensor, cache: Cache, all_logits: bool = False) -> torch.Tensor:
        """ids: [T] token ids following what `cache` holds. Returns FP32 logits of the last token ([1, vocab]),
        or of every token with all_logits. A prompt runs in passes of at most PREFILL_CHUNK tokens."""
        ids = ids.reshape(-1)
        if cache.length + ids.numel() > cache.k.shape[2]:
            raise ValueError(
                f"The conversation needs {cache.length + ids.numel()} positions; this cache holds "
                f"{cache.k.shape[2]}."
            )
        if ids.numel() == 1 and self.compiled is not None:
            return self.compiled_token(ids, cache)
        spans = range(0, ids.numel(), PREFILL_CHUNK)
        logits = [self.one_pass(ids[i : i + PREFILL_CHUNK], cache, all_logits) for i in spans]
        return torch.cat(logits) if all_logits else logits[-1]

    def one_pass(self, ids: torch.Tensor, cache: Cache, all_logits: bool) -> torch.Tensor:
        """The tokens `ids` in one forward pass. Several are padded to a multiple of PREFILL_STEP where the cache
        has room, with tokens after the real ones: no real token attends to them (causal), and the cache forgets
        them (its length counts the real ones)."""
        T, start = ids.numel(), cache.length
        if T > 1:
            ids = F.pad(ids, (0, min(-(-T // PREFILL_STEP) * PREFILL_STEP, cache.k.shape[2] - start) - T))
        n = ids.numel()
        where = torch.arange(start, start + n)
        mask = causal_mask(n, start, self.dtype) if n > 1 else None
        if self.alibi is not None:  # key j's score gets slope * j ([H, 1 or n, S]), once for every layer
            slopes = self.alibi[:, None, : start + n].to(self.dtype)
            mask = slopes if mask is None else slopes + mask
        rotation = None if self.rotation is None else self.rotation[start : start + n]
        x = self.through_blocks(
            self.embedded(ids, where), lambda layer, qkv: self.attend(qkv, cache, layer, rotation, mask)
        )
        logits = self.logits(x[:T] if all_logits else x[T - 1 : T])
        cache.length = start + T  # only once the pass is whole: a failed one leaves the cache as it was
        return logits

    def compiled_token(self, ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """A lone token through the compiled `tokens`: its cache one row of one slot, its position a tensor, the
        positions it attends to the mask's width, so one graph serves every position and cache capacity."""
        S = cache.length + 1
        with torch.inference_mode():  # inference tensors whatever the caller's mode (see inference)
            ids, where, rows = ids.clone(), torch.tensor([cache.length]), torch.zeros(1, dtype=torch.long)
            mask = torch.zeros(1, 1, 1, S)  # FP32, as a batched step's (slot_mask): one graph takes both
            if self.alibi is not None:  # the slopes rounded as forward rounds them
                mask = self.alibi[None, :, None, :S].to(self.dtype).float().contiguous()
            k, v = (t[:, None].unbind(0) for t in (cache.k, cache.v))
            if self.marking:  # compile_tokens: positions and capacity vary
                marked((mask, 3), *((t, 2) for t in (*k, *v)))
            logits = self.compiled(ids, where, rows, mask, k, v)
        cache.length = S
        return logits

    def step(self, ids: torch.Tensor, caches: list[Cache]) -> torch.Tensor:
        """One new token for each of several sequences at once ([B] ids; B slots of one `Pool`, of any lengths):
        the Linears read their weights once for all B rows (INT8 scales each row as a lone token), and one
        attention call per layer reads every row's slot up to its own position (`tokens`, compiled where the
        engine is). Returns FP32 logits, [B, vocab]."""
        pool = caches[0].pool
        if pool is None or any(c.pool is not pool for c in caches):
            raise ValueError("A batched step reads the slots of one pool (Engine.new_pool).")
        full = [c for c in caches if c.length >= c.k.shape[2]]
        if full:
            raise ValueError(
                f"A conversation needs {full[0].length + 1} positions; its cache holds {full[0].k.shape[2]}."
            )
        with torch.inference_mode():  # inference tensors whatever the caller's mode (see inference)
            where, slots = torch.tensor([c.length for c in caches]), torch.tensor([c.slot for c in caches])
            lo, span = int(slots.min()), int(slots.max() - slots.min()) + 1
            rows = slots - lo  # each batch row's place among the slots the attention call reads
            k, v = (t[:, lo : lo + span].unbind(0) for t in (pool.k, pool.v))
            ids, mask = ids.reshape(-1).clone(), self.slot_mask(where, rows, span)
            if self.marking:  # compile_tokens: rows, slots, positions and capacity vary
                dims = ((t, d) for t in (*k, *v) for d in (0, 2))
                marked((ids, 0), (where, 0), (rows, 0), (mask, 0), (mask, 3), *dims)
            run = self.tokens if self.compiled is None else self.compiled
            logits = run(ids, where, rows, mask, k, v)
        for c in caches:  # only once the pass is whole: a batch that fails is run again one by one
            c.length += 1
        return logits

    def slot_mask(self, where: torch.Tensor, rows: torch.Tensor, span: int) -> torch.Tensor:
        """[span, 1 or H, 1, S] for slots lo..lo+span-1 (S: the furthest position + 1): each batch row (at `rows`)
        sees its positions up to `where`, with ALiBi's slopes; a slot between them that is not in the batch sees
        position 0 only, so its row (thrown away) stays finite."""
        S = int(where.max()) + 1
        last = torch.zeros(span, dtype=torch.long).index_copy_(0, rows, where)
        mask = torch.zeros(span, 1, 1, S).masked_fill_(
            torch.arange(S) > last[:, None, None, None], float("-inf")
        )
        return mask if self.alibi is None else mask + self.alibi[None, :, None, :S]

    def tokens(
        self,
        ids: torch.Tensor,
        where: torch.Tensor,
        rows: torch.Tensor,
        mask: torch.Tensor,
        k: tuple[torch.Tensor, ...],
        v: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """B tokens ([B] ids), one per sequence: row i at position where[i] of cache rows[i] among the layers' K
        and V (`k`, `v`: [span, KV, capacity, D] each), attending to the mask's width of positions ([span, 1 or
        H, 1, S]): q and k rotated, K and V written in place, then one attention call per layer for all rows.
        A batched step, or a lone token (B = span = 1); the function the compiled engine compiles
        (compile_tokens). Returns FP32 logits, [B, vocab]."""
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        rotation = None if self.rotation is None else self.rotation[where]
        span, S = mask.shape[0], mask.shape[-1]

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            B = qkv.shape[0]
            qkv = qkv.view(B, H + 2 * KV, D)
            qk = qkv[:, : H + KV] if rotation is None else rope(qkv[:, : H + KV], rotation)
            # index_put_ on the layer's own tensor: compiled, it writes B positions in place, where writing
            # through one tensor of every layer made the graph copy every layer's cache every token
            k[layer][rows, :, where] = qk[:, H:]  # [B, KV, D]
            v[layer][rows, :, where] = qkv[:, H + KV :]
            q = qk.new_zeros(span, 1, H, D).index_copy_(0, rows, qk[:, None, :H])
            out = self.attention(q, k[layer][:, :, :S], v[layer][:, :, :S], mask)
            return out[rows].reshape(B, H * D)

        return self.logits(self.through_blocks(self.embedded(ids, where), attend))

    def embedded(self, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The tokens' input vectors, each at its position `where` (learned positions add that row)."""
        x = self.embed(ids).to(self.dtype)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.positions is not None:  # learned: the table's rows from position_offset on
            x = x + self.positions(where + self.arch.position_offset).to(self.dtype)
        return x

    def through_blocks(
        self, x: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Every block on the rows `x`; `attend(layer, qkv)` turns the rows' fused q/k/v into attention outputs."""
        for layer, b in enumerate(self.blocks):
            h = b.o(attend(layer, b.qkv(b.attn_norm(x))))
            x = x + (h if b.post_attn_norm is None else b.post_attn_norm(h))
            h = b.down(self.mlp(b.gate_up(b.mlp_norm(x))))
            x = x + (h if b.post_mlp_norm is None else b.post_mlp_norm(h))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(x)).float()
        return logits if self.logit_cap is None else torch.tanh(logits / self.logit_cap) * self.logit_cap

    def mlp(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not self.arch.gated:
            return self.act(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def attend(
        self,
        qkv: torch.Tensor,
        cache: Cache,
        layer: int,
        rotation: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One sequence's T rows of fused q/k/v ([T, (H + 2 KV) * D]: a prompt or a token) with their rotations
        ([T, D/2]): q and k rotated, K and V written to its cache after what it holds, its queries attending to
        all of it. mask: causal [T, S], with ALiBi's slopes [H, T or 1, S]. Returns [T, H * D]."""
        T, H, KV, D = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = qkv.view(T, H + 2 * KV, D)
        qk = qkv[:, : H + KV] if rotation is None else rope(qkv[:, : H + KV], rotation)
        end = cache.length + T
        cache.k[layer, :, cache.length : end] = qk[:, H:].transpose(0, 1)
        cache.v[layer, :, cache.length : end] = qkv[:, H + KV :].transpose(0, 1)
        k, v = cache.k[layer, :, :end], cache.v[layer, :, :end]  # [KV, S, D], views of the cache
        if self.attn_cap is None and T > 1:
            return self.fused_attention(qk[:, :H], k, v, mask)
        mask = None if mask is None else mask.view(1, -1, *mask.shape[-2:])
        return self.attention(qk[None, :, :H], k[None], v[None], mask).reshape(T, H * D)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """N sequences' T queries each ([N, T, H, D]) against their caches ([N, KV, S, D]), in FP32 whatever the
        cache holds: on a 2-vCPU AMD EPYC, SDPA's BF16 kernel took 6-8x as long for tokens (8 sequences, 64 to
        1000 positions: 1256 against 221 us a layer at 300), and oneDNN's BF16 matmul builds and keeps a kernel
        for every new length (1.1 MB each, never given back). A token and a batched step come here; a prompt
        too when Gemma 2 soft-caps its scores. GQA without repeating K/V: a group's G query heads are G x T rows
        against one cached head. mask: [N or 1, 1 or H, T or 1, S]. Returns [N, T, H, D], activations' dtype."""
        N, T, H, KV, D = *q.shape[:3], self.kv_heads, self.head_dim
        G = H // KV
        q = q.float().view(N, T, KV, G, D).permute(0, 2, 3, 1, 4).reshape(N, KV, G * T, D)
        scores = torch.matmul(q, k.float().transpose(-1, -2)).mul_(self.scale)  # [N, KV, G*T, S]
        if self.attn_cap is not None:  # Gemma 2's soft-capping, before the mask
            scores = torch.tanh(scores / self.attn_cap) * self.attn_cap
        if mask is not None:
            heads = (KV, G) if mask.shape[1] > 1 else (1, 1)  # per head (ALiBi) or one for all
            scores.view(N, KV, G, T, -1).add_(mask.float().view(mask.shape[0], *heads, *mask.shape[-2:]))
        out = torch.matmul(scores.softmax(-1), v.float())  # [N, KV, G*T, D]
        return out.view(N, KV, G, T, D).permute(0, 3, 1, 2, 4).reshape(N, T, H, D).to(self.dtype)

    def fused_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA's fused kernel for a prompt (ALiBi comes in the mask): 2.4x (FP32) and 2.1x (BF16) faster than
        the two matmuls at 512 tokens."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], mask, scale=self.scale, enable_gqa=True
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def compile_tokens(engine: Engine) -> None:
    """engine.tokens compiled (inductor's C++ backend) as engine.compiled, built now so no visitor waits for it:
    one graph for a lone token and one for a batch of any size (the compiled sizes), every Linear an opaque op
    in them (kernels.Kernel); positions, capacities, rows and slots as symbols. From its own copy of tokens'
    code: dynamo keeps its graphs on the code object, at most 8 (past that, eager without a word), so engines
    sharing one would crowd each other out and never free theirs."""
    use_project_cache()
    code = Engine.tokens
    code = types.FunctionType(code.__code__.replace(), code.__globals__, "tokens", code.__defaults__)
    # a partial would share dynamo's wrapper code between engines
    engine.compiled = inference(torch.compile(types.MethodType(code, engine), fullgraph=True))
    # Built by the calls the engine makes, on slots of a pool (the same views and strides), the sizes that vary
    # marked as symbols (marked): each its own size, as dynamo takes equal sizes for one symbol, and none 1,
    # taken as fixed. 33 positions of 64; the batch: 2 rows over 3 slots. Zeros: a NaN there would stop FBGEMM.
    pool = engine.new_pool(4)
    caches = [pool.take(2 * PREFILL_STEP) for _ in range(4)]
    for cache in caches:
        cache.length = PREFILL_STEP
    engine.marking = True
    engine.forward(torch.zeros(1, dtype=torch.long), caches[1])
    engine.step(torch.zeros(2, dtype=torch.long), [caches[3], caches[1]])
    engine.marking = False


def marked(*dims: tuple[torch.Tensor, int]) -> None:
    """Each (tensor, dim) a symbol in the graph dynamo builds next."""
    for t, dim in dims:
        torch._dynamo.mark_dynamic(t, dim)


def inference(compiled: Callable) -> Callable:
    """Called in inference mode, whatever the caller's: dynamo keeps a graph per grad mode. It also guards on
    each input's kind, so the callers make their small inputs inference tensors (compiled_token, step) and the
    caches are ordinary tensors always (untouched_zeros, new_cache): ids made in the app's inference mode ran a
    third build of a graph warmed up on ordinary ones (a minute before a cold start's first reply)."""

    def call(*args) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(*args)

    return call


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in FP32, scaled in the weight's dtype, back in the activations': transformers' LlamaRMSNorm when
    the weight is in the activations' dtype, GemmaRMSNorm when it is FP32 (1 + weight, see _Reader.norm)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(weight.dtype)).to(x.dtype)


def rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [T, heads, D] with pairs interleaved (see _Reader.interleave): one complex product."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation[:, None]).flatten(-2).to(x.dtype)


def rope_tables(config: dict, max_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin per position and frequency, built once with transformers' own RoPE variants (llama3, yarn…)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(**config)
    scaling = getattr(hf, "rope_scaling", None) or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq.float())
    return angles.cos() * scaling, angles.sin() * scaling


def causal_mask(T: int, start: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, start+T]: a prompt's token i sees the cache and prompt tokens up to itself."""
    seen = torch.arange(start + T)[None, :] <= torch.arange(start, start + T)[:, None]
    return torch.zeros(T, start + T, dtype=dtype).masked_fill_(~seen, float("-inf"))


# ---------------------------------------------------------------- loading


class _Reader:
    """Turns a folder's tensors into the engine's kernels, one layer at a time (peak memory: one layer)."""

    def __init__(
        self,
        tensors: Tensors,
        dtype: torch.dtype,
        reduce_range: bool,
        weight_only_down: bool = False,
        arch: Family = LLAMA,
        eps: float = 1e-6,
        rows: str = "fbgemm",
    ) -> None:
        self.t, self.dtype, self.reduce_range = tensors, dtype, reduce_range
        self.weight_only_down, self.arch, self.eps = weight_only_down, arch, eps
        self.rows = rows
        self.nbytes, self.kinds = 0, {}

    def norm(self, name: str) -> Norm:
        """A norm's weight (and a LayerNorm's bias): plain in the activations' dtype, or 1 + weight in FP32
        (Gemma)."""
        a = self.arch
        w = self.t.get(f"{name}.weight").float() + a.norm_offset
        w = w if a.norm_in_fp32 else w.to(self.dtype)
        bias = self.t.get(f"{name}.bias").to(w.dtype) if f"{name}.bias" in self.t else None
        self.nbytes += sum(v.numel() * v.element_size() for v in (w, bias) if v is not None)
        return Norm(w, bias, self.eps, a.layer_norm)

    def parts(self, name: str, rows: list[int] | None = None) -> dict:
        """One Linear's stored tensors, rows reordered by `rows` (an exact permutation of its outputs)."""
        keys = [k for k in ("qweight", "scale", "weight", "bias") if f"{name}.{k}" in self.t]
        got = {k: self.t.get(f"{name}.{k}") for k in keys}
        return {k: v[rows] if rows is not None else v for k, v in got.items()}

    def linear(
        self, names: list[str], rows: list[list[int] | None] | None = None, weight_only: bool = False
    ) -> Linear:
        """The Linears `names` (which share one input) as one kernel, their outputs concatenated; INT8 ones with
        `weight_only` keep their weights and take float activations."""
        parts = [self.parts(n, r) for n, r in zip(names, rows or [None] * len(names))]
        kinds = {"int8" if "qweight" in p else "float" for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"{names} mix INT8 and float weights; the engine fuses only like with like.")
        has_bias = any("bias" in p for p in parts)
        bias = (
            torch.cat(
                [
                    p["bias"].float() if "bias" in p else torch.zeros(len(p.get("scale", p.get("weight"))))
                    for p in parts
                ]
            )
            if has_bias
            else None
        )
        if kinds == {"int8"}:
            # one part is packed straight from the memory-mapped file: a copy first would add its bytes to the
            # load's peak (lm_head's 0.2 GB at 7B)
            q = parts[0]["qweight"] if len(parts) == 1 else torch.cat([p["qweight"] for p in parts])
            scale = torch.cat([p["scale"].float() for p in parts])
            if weight_only and WeightOnlyInt8Linear.takes(q.shape[1]):
                lin = WeightOnlyInt8Linear(q, scale, bias)
            else:
                small = self.rows == "onednn" and q.numel() < ONEDNN_ROWS_MIN_WEIGHTS
                lin = Int8Linear(q, scale, bias, self.reduce_range, "fbgemm" if small else self.rows)
        else:  # an INT8 folder's float tail keeps its stored dtype (BF16 or FP32); a BF16 model is BF16
            weight = torch.cat(
                [p["weight"] for p in parts]
            )  # a copy in ordinary memory, like the packed INT8
            bf16 = self.dtype == torch.bfloat16 or weight.dtype == torch.bfloat16
            lin = bf16_linear()(weight.to(torch.bfloat16), bias) if bf16 else FloatLinear(weight, bias)
        kind = {Int8Linear: "int8", WeightOnlyInt8Linear: "int8 weight-only"}.get(type(lin))
        for n in names:
            self.kinds[n] = kind or str(lin.dtype).removeprefix("torch.")
        self.nbytes += lin.nbytes
        return lin

    def block(self, prefix: str, head_dim: int, rotated_heads: int) -> Block:
        """One decoder block; `rotated_heads` (query plus KV heads; none without RoPE) have their rows reordered
        for rope()."""
        malloc_trim()  # the last layer's temporaries go back to the OS: the peak is the model plus one layer
        a = self.arch
        qkv, gate_up = [f"{prefix}.{n}" for n in a.qkv], [f"{prefix}.{n}" for n in a.gate_up]
        rotated = rotated_heads * head_dim
        if a.qkv_by_head:  # [q k v] of each head: q's rows of every head, then k's, then v's
            rows = [self.by_part(head_dim, self.out_features(qkv[0]))]
        elif not rotated:  # no RoPE: rows as stored
            rows = None
        elif len(qkv) == 1:  # fused: q's and k's rows, then v's
            rows = [self.interleave(head_dim, rotated) + list(range(rotated, self.out_features(qkv[0])))]
        else:
            rows = [self.interleave(head_dim, self.out_features(n)) for n in qkv[:2]] + [None]
        post = [self.norm(f"{prefix}.{n}") for n in a.post_norms] if a.post_norms else [None, None]
        return Block(
            attn_norm=self.norm(f"{prefix}.{a.norms[0]}"),
            qkv=self.linear(qkv, rows),
            o=self.linear([f"{prefix}.{a.o}"]),
            mlp_norm=self.norm(f"{prefix}.{a.norms[1]}"),
            gate_up=self.linear(gate_up),
            # 7-bit activations lose down_proj's outliers (WeightOnlyInt8Linear)
            down=self.linear([f"{prefix}.{a.down}"], weight_only=self.weight_only_down),
            post_attn_norm=post[0],
            post_mlp_norm=post[1],
        )

    def out_features(self, name: str) -> int:
        _, info, _ = self.t.where[
            self.t.stored_name(f"{name}.qweight" if f"{name}.qweight" in self.t else f"{name}.weight")
        ]
        return info["shape"][0]

    @staticmethod
    def by_part(head_dim: int, rows: int) -> list[int]:
        heads = rows // (3 * head_dim)
        return [
            (h * 3 + part) * head_dim + d for part in range(3) for h in range(heads) for d in range(head_dim)
        ]

    @staticmethod
    def interleave(head_dim: int, rows: int) -> list[int]:
        """transformers rotates dimension i with i + D/2 of each head; reordering q and k rows to (0, D/2, 1,
        D/2+1, …) makes the pairs adjacent, so RoPE is one complex product. q·k is unchanged: both are reordered
        the same way, and v is not touched."""
        half = head_dim // 2
        per_head = [j for i in range(half) for j in (i, i + half)]
        return [h * head_dim + j for h in range(rows // head_dim) for j in per_head]


def runs(config: dict) -> bool:
    """A family in FAMILIES whose row fits the config, without Phi-3's long-context RoPE (its factors switch
    with the sequence length)."""
    scaling = config.get("rope_scaling") or {}
    kinds = (scaling.get("type"), scaling.get("rope_type"))
    arch = FAMILIES.get(config.get("model_type"))
    config = in_engine_words(config) if arch else config
    return arch is not None and arch.fits(config) and "longrope" not in kinds


def is_engine_folder(folder: Path) -> bool:
    """A folder of a family the engine runs, with safetensors weights it can read."""
    config = folder / "config.json"
    if not config.is_file() or not safetensors_files(folder):
        return False
    return runs(json.loads(config.read_text()))


def load(
    folder: Path,
    reduce_range: bool | None = None,
    weight_only_down: bool | None = None,
    batched: bool = False,
    compiled: bool | None = None,
) -> Engine:
    """The engine for an INT8 folder (`engine.safetensors`) or a BF16 one (`model.safetensors`). By default the
    CPU decides: 8-bit activations with VNNI; else 7-bit ones, and down_proj weight-only. `batched`: it will
    decode many sequences at once (the app's scheduler, where memory has room), so its INT8 Linears run several
    rows (prompts, batches) from a second copy of their weights: on oneDNN for the large ones, or, asked for with
    Q8CHAT_COMPILED_ROWS=1, compiled for every one where a C++ compiler is found (compiled here, once, so no
    visitor waits for it; kernels.rows_kind). `compiled`: a lone token and a batched step run compiled (compile_tokens)
    where a C++ compiler is found; by default unless Q8CHAT_COMPILED_STEP=0 turns it off (kernels.step_wanted)."""
    folder = Path(folder)
    wanted = step_wanted() if compiled is None else compiled
    compiled = wanted and compiler() is not None
    config = json.loads((folder / "config.json").read_text())
    tensors = Tensors(safetensors_files(folder))
    reduce_range = not full_range_activations() if reduce_range is None else reduce_range
    weight_only_down = reduce_range if weight_only_down is None else weight_only_down
    int8 = tensors.metadata.get("format") == FORMAT
    how = f"{7 if reduce_range else 8}-bit activations" + (
        ", down_proj weight-only" if weight_only_down else ""
    )
    rows = rows_kind(batched and int8, reduce_range)
    label = f"Q8 engine, FBGEMM INT8 ({how})" if int8 else f"Q8 engine, BF16 ({bf16_linear().kernel})"
    asked = wanted or (batched and int8 and os.environ.get(COMPILED_ROWS) == "1")
    no_compiler = asked and not compiler()
    label += ROWS_LABEL[rows] + (", compiled decode step" if compiled else "")
    label += ", eager kernels (no C++ compiler)" if no_compiler else ""
    e = Engine(config, tensors, label, reduce_range, weight_only_down, rows, compiled)
    if (
        rows == "compiled"
    ):  # a prompt's rows through every Linear: inductor builds (or reads back) its kernels
        with torch.inference_mode():
            e.forward(torch.zeros(2, dtype=torch.long), e.new_cache(PREFILL_STEP))
    return e
