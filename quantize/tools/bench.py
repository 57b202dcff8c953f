"""python -m quantize.bench — INT8 vs BF16 decode speed on this CPU, measured the way the app runs them, next to
the memory-bandwidth floor of each model and, optionally, llama.cpp's Q8_0 as a peer.

Same loading path (decoders.open_int8 / open_bf16) and same loop (quantize.runtime.generate.stream, via
latency.interleaved): greedy, a fixed number of new tokens, rounds interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantize import families, files, machine, models
from quantize.errors import ModelError
from quantize.maintainer import evaluate
from quantize.runtime import decoders, latency, remote
from quantize.runtime.decoders import HFDecoder
from quantize.tools import bandwidth, concurrency, footprint, peer, random_model
from quantize.tools.app_probe import AppPanel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EPILOG = """examples:
  python -m quantize.bench                                   # the app's default INT8 folder vs the embedded BF16
  python -m quantize.bench --threads 1 2 --tokens 64 --json bench.json
  python -m quantize.bench --concurrency 1 2 4 8 --tokens 64 --rounds 3   # sequences at once (the scheduler)
  python -m quantize.bench --build-config-model /tmp/llama-400m   # random ~0.4B Llama: speed only, not quality
  python -m quantize.bench --concurrency 1 8 --endpoint vllm-int8=http://127.0.0.1:8000   # vLLM serving w8a8/
The peer (llama.cpp, `pip install llama-cpp-python`) runs a Q8_0 GGUF: for the embedded default model it is
made once from the shipped GGUF with llama.cpp's own quantizer; for any other model pass --peer-gguf."""


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
    "--size": dict(choices=sorted(random_model.SIZES), default="0.4b", help="body of the --build-config-model model: 0.4b, "
                   "1.5b (Qwen2.5-1.5B's) or 7b (Mistral-7B's) (default %(default)s)"),
    "--family": dict(choices=sorted(families.FAMILIES), default="llama", help="architecture of the "
                     "--build-config-model model (default %(default)s)"),
    "--layers": dict(type=int, default=None, help="decoder blocks of the --build-config-model model (default: the "
                     "size's own); the 7b body with 4 measures its per-block memory and time in minutes"),
    "--app": dict(metavar="URL", default=None, help="also time the running app's panel in the same rounds: its INT8 "
                  "chat reply to each prompt over HTTP, greedy, the per-token times its chart shows"),
    "--prompt-tokens": dict(type=int, metavar="N", default=0, help="prompts of N tokens cut from the held-out "
                            "prose instead of the chat prompts (as many as --prompts): each engine's time to first "
                            "token is that prompt's prefill, shown with prefill tokens/s"),
    "--concurrency": dict(type=int, nargs="+", metavar="N", default=None, help="instead of the table above: N "
                          "greedy sequences at once through the app's scheduler, for each N, INT8 and BF16 engines "
                          "interleaved: per-sequence ms per token and aggregate tokens/s"),
    "--endpoint": dict(action="append", metavar="[NAME=]URL", default=[], help="also time an OpenAI-compatible "
                       "server (vLLM serving the export, or the BF16 original) in the same rounds: the same token "
                       "ids, greedy, exactly --tokens tokens (vLLM's ignore_eos), stamped here as they arrive, "
                       "network included; NAME labels it (default: its host). Repeatable"),
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
    """--prompts: the first N held-out chat prompts, or the strings of a JSON file."""
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


def prose_prompts(tok: PreTrainedTokenizerBase, tokens: int, count: int) -> list[torch.Tensor]:
    """`count` prompts of `tokens` tokens each, consecutive slices of the held-out prose."""
    ids = tok(evaluate.heldout_text(), return_tensors="pt").input_ids
    if ids.shape[1] < tokens * count:
        raise ModelError(f"--prompt-tokens {tokens} x {count} prompts needs {tokens * count} tokens of held-out "
                         f"prose; it has {ids.shape[1]}.")  # fmt: skip
    return [ids[:, i * tokens : (i + 1) * tokens] for i in range(count)]


@dataclass
class Prompts:
    """The prompts of a run, as token ids (what the engines in this process are given) and as text (what the app
    is sent over HTTP, and what the report lists)."""

    ids: list[torch.Tensor]
    texts: list[str]

    def by_ids(self) -> dict[tuple, str]:
        """Each text under its token ids: the rounds hand every engine ids, and the app needs the text back."""
        return {tuple(ids[0].tolist()): text for ids, text in zip(self.ids, self.texts)}


def tokenize_prompts(tok: PreTrainedTokenizerBase, texts: list[str], prompt_tokens: int) -> Prompts:
    """The chat prompts in the app's template; with --prompt-tokens, as many prose slices of that length instead,
    decoded back to text so that the report says what was prefilled."""
    if not prompt_tokens:
        return Prompts([evaluate.prompt_ids(tok, p) for p in texts], texts)
    ids = prose_prompts(tok, prompt_tokens, len(texts))
    return Prompts(ids, [tok.decode(p[0], skip_special_tokens=True) for p in ids])


def check_args(args: argparse.Namespace) -> None:
    """The option combinations that cannot be measured, refused before anything is loaded."""
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


def int8_folder(arg: str | None, revision: str | None) -> Path:
    """--int8 as a folder; without it the app's cached default INT8 folder, which must have been built."""
    if arg is None:
        path = models.default_int8_dir()
        if not models.is_int8_folder(path):
            raise ModelError(
                f"There is no default INT8 model in {path}: make it with "
                f"`python -m quantize --out {path}` or pass --int8."
            )
        return path
    return models.resolve_int8(arg, revision=revision)


def folders(args: argparse.Namespace) -> tuple[Path, Path, bool]:
    """(BF16 folder, INT8 folder, whether BF16 is the embedded default) from the arguments."""
    if args.build_config_model:
        tok = models.load_tokenizer(models.resolve_model(None))
        size = random_model.SIZES[args.size] | ({"num_hidden_layers": args.layers} if args.layers else {})
        bf16_dir, int8_dir = random_model.build_config_model(
            args.build_config_model, tok, size, family=args.family
        )
        print(f"random-weight {args.family}: --bf16 {bf16_dir} --int8 {int8_dir} (speed only, not quality)")
        return bf16_dir, int8_dir, False
    int8_dir = int8_folder(args.int8, args.int8_revision)  # first: a wrong --int8 fails before any loading
    return models.resolve_model(args.bf16), int8_dir, args.bf16 is None


def open_decoders(
    bf16_dir: Path,
    int8_dir: Path,
    names: tuple[str, ...] = ("int8", "bf16", "hf_bf16"),
    batched: bool = False,
) -> dict:
    """The engines that fit in memory together, by the app's rule (weights x machine.HEADROOM within the room
    there is): INT8, then the BF16 engine, then transformers' BF16, each with every one before it. A 7B model's
    BF16 sides do not fit a 24 GB machine beside its INT8: those are left out, and the bench says so. `batched`:
    INT8 loaded as the app loads it to serve many sequences at once (engine.load), its weights counted twice."""
    int8_bytes, bf16_bytes, room = (
        decoders.weight_file_bytes(int8_dir) * (2 if batched else 1),
        decoders.weight_file_bytes(bf16_dir),
        machine.memory_room(),
    )
    # What the bench times, in this order: the engine on both models (the panel's comparison), transformers' own
    # BF16 loop (what a visitor would get without Q8-Chat) and, outside this process, llama.cpp (the pace to beat).
    openers = {  # name: (how to open it, its weights with every engine opened before it)
        "int8": (lambda p: decoders.open_int8(p, batched=batched), int8_bytes),
        "bf16": (decoders.open_bf16, int8_bytes + bf16_bytes),
        "hf_bf16": (
            lambda p: HFDecoder(models.load_bf16(p), "transformers BF16"),
            int8_bytes + 2 * bf16_bytes,
        ),
    }
    opened = {}
    for name, (open_model, together) in [(n, openers[n]) for n in names]:
        if name != "int8" and together * machine.HEADROOM > room:
            print(f"{latency.LABELS[name]}: not timed: with the engines before it, {together / 1e9:.2f} GB of "
                  f"weights ({together * machine.HEADROOM / 1e9:.2f} GB with room for caches and activations) need "
                  f"more than the {room / 1e9:.2f} GB of memory this machine has free")  # fmt: skip
            break
        opened[name] = open_model(int8_dir if name == "int8" else bf16_dir)
    vocab = {name: d.config["vocab_size"] for name, d in opened.items()}
    if len(set(vocab.values())) != 1:
        raise ModelError(f"{int8_dir} and {bf16_dir} are not the same model (vocabularies of {vocab}).")
    for name, d in opened.items():
        print(f"{latency.LABELS[name]}: {d.label}")
    return opened


# ---------------------------------------------------------------- measuring


def measure_threads(
    opened: dict,
    peer_gguf: Path | None,
    prompts: Prompts,
    args: argparse.Namespace,
) -> dict[int, dict]:
    """Per thread count: every decoder (the peer, the app's panel) interleaved, the order alternating every
    round."""
    from tqdm import tqdm

    n_ctx = max(512, max(p.shape[1] for p in prompts.ids) + args.tokens + 8)
    out = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        engines = dict(opened) | servers(args.endpoint)
        if args.app:
            engines["app"] = AppPanel(args.app, prompts.by_ids(), threads)
        if peer_gguf is not None:
            engines["peer"] = peer.Peer(peer_gguf, threads, n_ctx)
        with tqdm(
            total=args.rounds * len(prompts.ids) * len(engines),
            desc=f"{threads} threads",
            unit="gen",
            leave=False,
        ) as bar:
            res = latency.interleaved(engines, prompts.ids, args.tokens, args.rounds, progress=bar)
        if peer_gguf is not None:
            engines["peer"].close()
        res["cpu"] = machine.describe_cpu().line()
        res["prompt_tokens"] = statistics.median(p.shape[1] for p in prompts.ids)  # the TTFT's prefill
        out[threads] = res
    return out


def servers(specs: list[str]) -> dict[str, remote.Endpoint]:
    """--endpoint: each server under its NAME (or host), its model asked for now, so that a wrong URL fails before
    any round."""
    found = {}
    for spec in specs:
        name, _, url = spec.partition("=") if "=" in spec.split("://")[0] else ("", "", spec)
        if name in latency.LABELS:
            raise ModelError(f"--endpoint {name}=…: that name is the bench's own; call the server otherwise.")
        endpoint = remote.Endpoint(url, name or "benchmarked")
        endpoint.connect()
        found[name or endpoint.host] = endpoint
        print(f"{name or endpoint.host}: {endpoint.model}, {endpoint.label}")
    return found


def profile_decode(model: torch.nn.Module, input_ids: torch.Tensor, tokens: int, rows: int = 12) -> str:
    """The ops an INT8 token spends its time in (torch.profiler, self CPU time), to see what is not streaming
    weights: per-op glue, quantize/dequantize, BF16 GEMV."""
    from torch.profiler import ProfilerActivity, profile

    latency.time_generation(model, input_ids, 4)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latency.time_generation(model, input_ids, tokens)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"INT8 decode profile, {tokens} tokens ({torch.get_num_threads()} threads):\n{table}"


def outside_sizes(sizes: dict, peer_gguf: Path | None, app: str | None) -> dict:
    """The bytes of what runs outside this process: llama.cpp's GGUF, and the app's INT8 chat model (the same
    bytes as the bench's INT8 when the app serves this model)."""
    out = {"app": sizes["int8"]} if app else {}
    if peer_gguf is not None:
        out["peer"] = {
            "weight_bytes": peer_gguf.stat().st_size,
            "bytes_per_token": peer.gguf_bytes_per_token(peer_gguf),
            "path": str(peer_gguf),
        }
    return out


# ---------------------------------------------------------------- reporting


def table(threads: int, res: dict) -> str:
    """One thread count's measurements as the printed table, with its speed-up lines."""
    lines = [
        f"== {threads} thread{'s' if threads > 1 else ''}: {res['cpu']}",
        f"copy bandwidth {res['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth.BANDWIDTH_MIB} MiB copy, best of 5); "
        f"{res['prompts']} prompts of {res['prompt_tokens']:.0f} tokens (median) x {res['new_tokens']} tokens x "
        f"{res['rounds']} rounds, greedy",
        f"{'model':<19}{'median ms':>10}{'p10 ms':>8}{'p90 ms':>8}{'TTFT ms':>9}{'prefill tok/s':>14}{'tok/s':>8}"
        f"{'MB/token':>10}{'floor ms':>10}{'x floor':>9}{'added MB':>10}{'load peak MB':>14}",
    ]
    for name, m in res["models"].items():
        mb = {k: m[k] / 1e6 for k in ("bytes_per_token", "added_bytes", "load_peak_bytes") if k in m}
        cells = [(m["median_ms"], 10, ".2f"), (m["p10_ms"], 8, ".2f"), (m["p90_ms"], 8, ".2f"),
                 (m["ttft_ms"], 9, ".1f"), (m["prefill_tokens_per_s"], 14, ".0f"), (m["tokens_per_s"], 8, ".1f"),
                 (mb.get("bytes_per_token"), 10, ".1f"), (m.get("floor_ms"), 10, ".2f"), (m.get("x_floor"), 9, ".2f"),
                 (mb.get("added_bytes"), 10, ".0f"), (mb.get("load_peak_bytes"), 14, ".0f")]  # fmt: skip
        label = latency.LABELS.get(name, name)  # a server's: its --endpoint NAME
        lines.append(f"{label:<19}" + "".join(f"{latency.fmt(v, spec):>{w}}" for v, w, spec in cells))
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
    for name in [
        n for n in res["models"] if n not in latency.LABELS
    ]:  # the servers, against the engine's INT8
        ratios = latency.round_ratios(res, name, "int8")
        each = " ".join(f"{r:.2f}x" for r in ratios)
        lines.append(
            f"{name}: the INT8 engine is {statistics.median(ratios):.2f}x its speed per token (rounds {each})"
        )
    if "app" in res["models"]:
        ratios = latency.round_ratios(res, "app", "int8")
        each = " ".join(f"{r:.2f}x" for r in ratios)
        lines.append(
            f"app panel: {statistics.median(ratios):.2f}x the bench's INT8 ms per token (rounds {each})"
        )
    return "\n".join(lines)


def memory_line(memory: dict[str, dict]) -> str:
    """The resident memory each engine added in its own process, and INT8's share of BF16's."""
    added = {n: memory[n]["added_bytes"] for n in memory}
    each = ", ".join(f"{latency.LABELS[n]} {b / 1e6:.0f} MB" for n, b in added.items())
    share = f"; INT8/BF16 {added['int8'] / added['bf16']:.2f}x" if "bf16" in added else ""
    return f"resident memory added (fresh process each): {each}{share}"


def write_report(path: Path, report: dict) -> None:
    """--json: every measurement of the run, in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_file(path, json.dumps(report, indent=1))
    print(f"measurements written to {path}")


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace, command: str) -> int:
    """The benchmark for parsed `args`; `command` is the command line as the JSON report records it."""
    check_args(args)
    texts = load_prompts(args.prompts)  # before the folders: a bad --prompts fails before any model is built
    bf16_dir, int8_dir, bf16_is_default = folders(args)
    prompts = tokenize_prompts(models.load_tokenizer(bf16_dir), texts, args.prompt_tokens)
    names = ("int8", "bf16") if args.concurrency else ("int8", "bf16", "hf_bf16")
    # prompts and batches are read as the app reads them: INT8's rows from the second copy its engine makes there
    opened = open_decoders(bf16_dir, int8_dir, names, batched=bool(args.concurrency or args.prompt_tokens))
    if args.concurrency:
        return run_concurrency(args, command, opened, prompts)
    peer_gguf, peer_line = peer.find_peer(args.peer, args.peer_gguf, bf16_dir, bf16_is_default)
    print(peer_line)

    per_threads = measure_threads(opened, peer_gguf, prompts, args)
    if args.profile:
        print(profile_decode(opened["int8"], prompts.ids[0], args.profile))
    sizes = {
        n: {"weight_bytes": d.weight_bytes, "bytes_per_token": d.bytes_per_token} for n, d in opened.items()
    }
    del opened  # free the engines before the footprints' children load each model again beside this process
    timed = {n: int8_dir if n == "int8" else bf16_dir for n in sizes}  # not those left out for lack of memory
    memory = footprint.footprints(timed, batched=bool(args.prompt_tokens))  # as the engines were timed
    sizes |= outside_sizes(sizes, peer_gguf, args.app)
    for threads, res in per_threads.items():
        bandwidth.add_floors(res, threads, sizes, memory)
        print(table(threads, res))
    print(memory_line(memory))
    if args.json:
        report = {"command": command, "created": time.strftime("%Y-%m-%d"), "tokens": args.tokens,
                  "rounds": args.rounds, "prompts": prompts.texts, "cpu": machine.describe_cpu().asdict(),
                  "peer": peer_line, "memory": memory, "models": sizes,
                  "threads": {str(t): r for t, r in per_threads.items()}}  # fmt: skip
        write_report(args.json, report)
    return 0


def run_concurrency(args: argparse.Namespace, command: str, opened: dict, prompts: Prompts) -> int:
    """--concurrency: the engines (INT8, BF16) at each number of sequences at once, per thread count."""
    engines = {n: d for n, d in opened.items() if n in ("int8", "bf16")} | servers(args.endpoint)
    per_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        levels = sorted(set(args.concurrency))
        per_threads[str(threads)] = concurrency.measure(
            engines, prompts.ids, levels, args.tokens, args.rounds
        )
        print(concurrency.table(threads, per_threads[str(threads)], machine.describe_cpu().line()))
    if args.json:
        report = {"command": command, "created": time.strftime("%Y-%m-%d"), "tokens": args.tokens,
                  "rounds": args.rounds, "prompts": prompts.texts, "cpu": machine.describe_cpu().asdict(),
                  "labels": {n: d.label for n, d in engines.items()}, "concurrency": per_threads}  # fmt: skip
        write_report(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m quantize.bench: 0 once measured, 2 with one sentence on stderr for what cannot be measured."""
    logging.basicConfig(
        level=logging.INFO if os.environ.get("Q8CHAT_VERBOSE") else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    args = parse_args(argv)
    command = " ".join(["python -m quantize.bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args, command)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
