"""`python -m quantize.bench` on a tiny random Llama: INT8 and BF16 timed by the app's loop, interleaved, next to
the bandwidth floor; and a bad --int8 is one clear sentence."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_LLAMA
from transformers import LlamaConfig, LlamaForCausalLM

from quantize import models
from quantize.tools import peer, random_model


def run_bench(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m quantize.bench ...` in a child process, as conftest.run_cli runs `python -m quantize`."""
    return subprocess.run(
        [sys.executable, "-m", "quantize.tools.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_bench_tiny_model(tmp_path, tokenizer):
    bf16_dir, int8_dir = random_model.build_config_model(
        tmp_path / "tiny", tokenizer, size=TINY_LLAMA, samples=4
    )
    out = tmp_path / "out.json"
    proc = run_bench(
        "--int8",
        str(int8_dir),
        "--bf16",
        str(bf16_dir),
        "--tokens",
        "4",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--prompts",
        "1",
        "--json",
        str(out),
        "--profile",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for word in (
        "median ms",
        "p10 ms",
        "p90 ms",
        "TTFT ms",
        "tok/s",
        "MB/token",
        "floor ms",
        "x floor",
        "copy bandwidth",
        "speed-up",
        "added MB",
        "load peak MB",
        "resident memory added",
        "peer",
        "INT8 engine",
        "BF16 engine",
        "transformers BF16",
        "INT8 decode profile",
        "Self CPU",
    ):
        assert word in proc.stdout, (word, proc.stdout)

    report = json.loads(out.read_text())
    res = report["threads"]["1"]
    bandwidth = res["bandwidth_bytes_per_s"]
    assert bandwidth > 0 and f"copy bandwidth {bandwidth / 1e9:.1f} GB/s" in proc.stdout
    # What a token streams, counted from the files themselves: every tensor but the embedding, which is only
    # gathered (this model's lm_head is its own matrix). The floor is the time to stream those bytes once at the
    # copy bandwidth measured in the same run.
    streamed = {
        "int8": _streamed_bytes(int8_dir, "engine*.safetensors"),
        "bf16": _streamed_bytes(bf16_dir, "model*.safetensors"),  # one shard per block here
    }
    streamed["hf_bf16"] = streamed["bf16"]
    assert streamed["bf16"] > 1.5 * streamed["int8"]  # BF16 reads ~2x the bytes of INT8
    for name in ("int8", "bf16", "hf_bf16"):
        m = res["models"][name]
        assert m["median_ms"] > 0 and m["ttft_ms"] > 0 and len(m["round_median_ms"]) == 2
        assert m["bytes_per_token"] == pytest.approx(streamed[name], rel=1e-3), name
        assert m["floor_ms"] == pytest.approx(streamed[name] / bandwidth * 1e3, rel=1e-3), name
        assert m["x_floor"] == pytest.approx(m["median_ms"] / (streamed[name] / bandwidth * 1e3), rel=1e-3), (
            name
        )
        assert m["added_bytes"] > 0 and m["load_peak_bytes"] >= m["added_bytes"] * 0.5
    assert len(res["speedup_per_round"]) == 2 and all(r > 0 for r in res["speedup_per_round"])
    assert f"the bytes each token reads predict {streamed['bf16'] / streamed['int8']:.2f}x" in proc.stdout
    # The peer runs where the optional llama_cpp is installed (on a GGUF written from the built model) and is
    # skipped with a line otherwise; either way the run goes on.
    import importlib.util

    if importlib.util.find_spec("llama_cpp"):
        assert res["models"]["peer"]["median_ms"] > 0
    else:
        assert "peer" not in res["models"] and "peer skipped: llama_cpp is not installed" in proc.stdout


def test_bench_leaves_out_the_bf16_sides_that_do_not_fit(tmp_path, tokenizer):
    """A 7B model's BF16 beside its INT8 does not fit a 24 GB machine: with room for INT8 and half of BF16, the
    bench times INT8 alone and says why instead of being killed."""
    bf16_dir, int8_dir = random_model.build_config_model(
        tmp_path / "tiny", tokenizer, size=TINY_LLAMA, samples=4
    )
    size = {d: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (bf16_dir, int8_dir)}
    cap = size[int8_dir] + size[bf16_dir] // 2
    out = tmp_path / "out.json"
    args = ["--int8", str(int8_dir), "--bf16", str(bf16_dir), "--tokens", "4", "--rounds", "1", "--threads", "1",
            "--prompts", "1", "--no-peer", "--json", str(out)]  # fmt: skip
    proc = run_bench(*args, env={"Q8CHAT_MEMORY_BYTES": str(cap)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BF16 engine: not timed" in proc.stdout and f"the {cap / 1e9:.2f} GB of memory" in proc.stdout
    res = json.loads(out.read_text())["threads"]["1"]
    assert set(res["models"]) == {"int8"} and res["models"]["int8"]["x_floor"] > 0


def _streamed_bytes(folder, pattern: str) -> int:
    """Bytes of every tensor in a folder's safetensors files but the token embedding's, from the files' own
    headers."""
    import struct

    total = 0
    for path in sorted(folder.glob(pattern)):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(
            end - start
            for name, info in header.items()
            if name != "__metadata__" and not name.startswith("model.embed_tokens")
            for start, end in [info["data_offsets"]]
        )
    return total


def test_missing_int8_folder_is_one_sentence():
    proc = run_bench("--int8", "/nonexistent")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "/nonexistent" in lines[0], proc.stderr[
        -2000:
    ]


def test_app_with_two_thread_counts_is_refused_before_any_request():
    """The app runs at one thread count: timing it at two would time it at a count it does not run. Port 9
    (discard) never answers, so reaching it would end in a connection error, not this sentence."""
    proc = run_bench("--app", "http://127.0.0.1:9", "--threads", "1", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--app times the app at its own thread count" in proc.stderr


@pytest.fixture
def peer_gguf(tmp_path, tokenizer):
    """A tiny random Llama with the default tokenizer, and the peer's Q8_0 GGUF written from it."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **TINY_LLAMA))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder, peer.gguf_q8_0_from_llama(folder, folder / "peer.Q8_0.gguf")


def test_peer_gguf_holds_the_same_weights(peer_gguf):
    """Every matrix Q8_0 and equal to the BF16 weights within Q8_0's step."""
    import gguf

    model, _, path = peer_gguf
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert len(tensors) == 3 + 9 * TINY_LLAMA["num_hidden_layers"]
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0
    ref = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    got = gguf.quants.dequantize(down.data, down.tensor_type).reshape(ref.shape)
    assert np.abs(got - ref).max() <= np.abs(ref).max() / 127 + 1e-6


def test_peer_gguf_predicts_like_transformers(peer_gguf, tokenizer):
    """llama.cpp's next-token logits on the peer GGUF agree with transformers' on the folder (only where the
    optional llama_cpp is installed: it is the bench's peer, not a project dependency)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp is optional (the bench's peer)")
    _, folder, path = peer_gguf
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    ids = tokenizer("Hello there, how are you?").input_ids
    llm.eval(ids)
    theirs = np.array(llm.scores[llm.n_tokens - 1])
    with torch.inference_mode():
        ours = models.load_bf16(folder).float()(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    assert theirs.argmax() == ours.argmax() and np.corrcoef(theirs, ours)[0, 1] > 0.99


def test_prompt_tokens_prefill_prose_prompts_of_that_length(tmp_path, tokenizer):
    """--prompt-tokens N: every engine is given N-token slices of the held-out prose, so its time to first token
    is an N-token prefill, and the report says what was prefilled."""
    from quantize.maintainer import evaluate

    bf16_dir, int8_dir = random_model.build_config_model(
        tmp_path / "tiny", tokenizer, size=TINY_LLAMA, samples=4
    )
    out = tmp_path / "out.json"
    flags = (
        "--tokens",
        "2",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--prompts",
        "2",
        "--no-peer",
        "--json",
        str(out),
    )
    proc = run_bench("--int8", str(int8_dir), "--bf16", str(bf16_dir), "--prompt-tokens", "96", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    prose = evaluate.heldout_text()
    for text in report["prompts"]:
        # (re-encoding the decoded slice can merge or split the last token)
        assert text.strip() in prose and abs(len(tokenizer(text).input_ids) - 96) <= 1, text
    assert report["prompts"][0] != report["prompts"][1]
    assert "prompts of 96 tokens" in proc.stdout and "prefill tok/s" in proc.stdout
    res = report["threads"]["1"]["models"]
    assert {"int8", "bf16"} <= set(res) and all(m["ttft_ms"] > 0 for m in res.values())
    refused = run_bench(
        "--int8", str(int8_dir), "--bf16", str(bf16_dir), "--prompt-tokens", "100000", *flags[:-2]
    )
    assert refused.returncode != 0 and "needs 200000 tokens of held-out prose" in refused.stderr


def test_concurrency_measures_each_number_of_sequences_at_once(tmp_path, tokenizer):
    bf16_dir, int8_dir = random_model.build_config_model(
        tmp_path / "tiny", tokenizer, size=TINY_LLAMA, samples=4
    )
    out = tmp_path / "out.json"
    args = [
        "--int8",
        str(int8_dir),
        "--bf16",
        str(bf16_dir),
        "--tokens",
        "5",
        "--rounds",
        "2",
        "--threads",
        "1",
    ]
    proc = run_bench(*args, "--prompts", "2", "--concurrency", "1", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    levels = report["concurrency"]["1"]
    assert set(levels) == {"1", "3"}
    for n in ("1", "3"):
        for name in ("int8", "bf16"):
            m = levels[n][name]
            assert m["median_ms"] > 0 and len(m["round_tokens_per_s"]) == 2 and m["tokens_per_s"] > 0
    printed = {
        line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()
    }
    assert set(printed) == {"1", "3"} and printed["1"][3] == printed["1"][6] == "1.00"  # N=1 is its own unit
    assert "transformers BF16" not in proc.stdout  # only the two engines the app batches are opened
