"""`python -m quantize.bench` on a tiny random Llama: INT8 and BF16 timed by the app's loop, interleaved, next to
the bandwidth floor; and a bad --int8 is one clear sentence."""

import json
import os
import subprocess
import sys

from conftest import ROOT

from quantize import bench

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m quantize.bench ...` in a child process, as conftest.run_cli runs `python -m quantize`."""
    return subprocess.run([sys.executable, "-m", "quantize.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_bench_tiny_model(tmp_path, tokenizer):
    bf16_dir, int8_dir = bench.build_config_model(tmp_path / "tiny", tokenizer, size=TINY, samples=4)
    out = tmp_path / "out.json"
    proc = run_bench("--int8", str(int8_dir), "--bf16", str(bf16_dir), "--tokens", "4", "--rounds", "2",
                     "--threads", "1", "--prompts", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for word in ("median ms", "p10 ms", "p90 ms", "TTFT ms", "tok/s", "MB/token", "floor ms", "x floor",
                 "copy bandwidth", "speed-up", "peak RSS", "peer"):
        assert word in proc.stdout, (word, proc.stdout)

    report = json.loads(out.read_text())
    res = report["threads"]["1"]
    assert res["bandwidth_bytes_per_s"] > 0
    for name in ("int8", "bf16"):
        m = res["models"][name]
        assert m["median_ms"] > 0 and m["ttft_median_ms"] > 0 and m["floor_ms"] > 0 and m["x_floor"] > 0
        assert len(m["round_median_ms"]) == 2
        assert 0 < report["models"][name]["bytes_per_token"] < report["models"][name]["weight_bytes"]
    assert len(res["speedup_per_round"]) == 2 and all(r > 0 for r in res["speedup_per_round"])
    assert "peer" not in res["models"]  # no GGUF of a random model: the peer is skipped, the run goes on


def test_missing_int8_folder_is_one_sentence():
    proc = run_bench("--int8", "/nonexistent")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "/nonexistent" in lines[0], proc.stderr[-2000:]
