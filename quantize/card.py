"""quantize_report.json and the model card (README.md) of the INT8 folder, from what this run measured."""

from __future__ import annotations

import datetime as dt
import json
from importlib import metadata
from pathlib import Path

from quantize.recipe import Recipe

# The quality bar of the project (issue #2): the shipped INT8 model against BF16 on held-out text.
MAX_PERPLEXITY_RATIO = 1.10
MIN_TOP1_AGREEMENT = 0.85
FRONTIER = Path(__file__).parent / "frontier.json"
BENCH = Path(__file__).parent / "bench.json"  # the latest `python -m quantize.bench --json quantize/bench.json`
BENCH_LABELS = {"int8": "INT8 engine", "bf16": "BF16 engine", "hf_bf16": "transformers BF16",
                "peer": "llama.cpp Q8_0"}
PINNED = ["torch", "transformers", "optimum-intel", "optimum", "neural-compressor", "huggingface-hub", "numpy"]


def versions() -> dict[str, str]:
    out = {}
    for name in PINNED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_report(done: dict, recipe: Recipe, base_id: str, source: str, int8_dir: Path) -> dict:
    quality = {name: dict(v) for name, v in done["quality"]["models"].items()}
    if done.get("baseline"):
        quality["int8_no_sq"] = {k: v for k, v in done["baseline"].items() if k != "recipe"}
    int8 = quality["int8"]
    speed = done["speed"]
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_id,
        "source": source,
        "recipe": done["quantize"]["recipe"],
        "smoothquant": done["quantize"]["smoothquant"],
        "modules": done["quantize"]["modules"],
        "calibration_samples": done["quantize"]["calibration_samples"],
        "quality": quality,
        "quality_eval": {k: v for k, v in done["quality"].items() if k != "models"},
        "quality_bar": {
            "max_perplexity_ratio": MAX_PERPLEXITY_RATIO,
            "min_top1_agreement": MIN_TOP1_AGREEMENT,
            "perplexity_ok": int8["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO,
            "top1_ok": int8["top1_agreement"] >= MIN_TOP1_AGREEMENT,
        },
        "speed": {k: v for k, v in speed.items() if k != "cpu"},
        "cpu": speed["cpu"],
        "disk_bytes": sum(f.stat().st_size for f in Path(int8_dir).glob("pytorch_model.bin")),
        "versions": versions(),
        "frontier": json.loads(FRONTIER.read_text()) if FRONTIER.is_file() else None,
        "bench": json.loads(BENCH.read_text()) if BENCH.is_file() else None,
    }
    report["quality_bar"]["met"] = report["quality_bar"]["perplexity_ok"] and report["quality_bar"]["top1_ok"]
    return report


def _f(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def summary_table(report: dict) -> str:
    q, s = report["quality"], report["speed"]["models"]
    rows = ["| model | perplexity | x BF16 | top-1 vs BF16 | chat top-1 vs BF16 | greedy match | median ms/token | "
            "p10–p90 | TTFT ms |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("bf16", "int8", "int8_no_sq"):
        if name not in q:
            continue
        m, t = q[name], s.get(name, {})
        spread = f"{_f(t.get('p10_ms'), '.1f')}–{_f(t.get('p90_ms'), '.1f')}" if t else "–"
        rows.append(f"| {name} | {_f(m['perplexity'])} | {_f(m['perplexity_ratio'], '.3f')} | "
                    f"{_f(m['top1_agreement'], '.3f')} | {_f(m.get('chat_top1_agreement'), '.3f')} | "
                    f"{_f(m['greedy_prefix_match'], '.2f')} | "
                    f"{_f(t.get('median_ms'), '.1f')} | {spread} | {_f(t.get('ttft_median_ms'), '.1f')} |")
    sp = report["speed"]
    rows.append(f"\nINT8 speed-up over BF16 (median of per-round ratios): **{sp['speedup_median']:.2f}x** "
                f"(rounds: {', '.join(f'{r:.2f}' for r in sp['speedup_per_round'])})")
    return "\n".join(rows)


def frontier_table(frontier: dict | None) -> str:
    if not frontier:
        return "_No frontier measured yet: run `python -m quantize.frontier`._"
    rows = [f"Measured by `{frontier['command']}` on {frontier['created']} ({frontier['cpu']}).", "",
            "| variant | perplexity x BF16 | top-1 vs BF16 | chat top-1 | INT8 ms/token | BF16 ms/token | speed-up | "
            "weights in INT8 |", "|---|---|---|---|---|---|---|---|"]
    for v in frontier["variants"]:
        rows.append(f"| {v['name']} | {v['perplexity_ratio']:.3f} | {v['top1_agreement']:.3f} | "
                    f"{v.get('chat_top1_agreement', float('nan')):.3f} | "
                    f"{v['int8_ms']:.1f} | {v['bf16_ms']:.1f} | {v['speedup']:.2f}x | {v['int8_weight_share']:.0%} |"
                    + (" ¹" if v.get("measured_by") else ""))
    later = sorted({v["measured_by"] for v in frontier["variants"] if v.get("measured_by")})
    if later:
        rows += ["", "¹ measured later, by " + "; ".join(f"`{c}`" for c in later) + ". Speed-ups are same-run "
                 "ratios against BF16 in each run; absolute ms are not comparable across runs."]
    return "\n".join(rows)


def bench_table(bench: dict | None) -> str:
    """The latest speed benchmark, one row per thread count and engine, with each model's bandwidth floor."""
    if not bench:
        return "_No benchmark recorded yet: run `python -m quantize.bench --json quantize/bench.json`._"
    cpu = bench["cpu"]
    rows = [f"Measured by `{bench.get('command', 'python -m quantize.bench')}` on {bench.get('created', '?')} "
            f"({cpu['model']}); {len(bench['prompts'])} prompts x {bench['tokens']} tokens x {bench['rounds']} "
            "rounds, greedy, engines interleaved in one process.", "",
            "| threads | engine | median ms/token | p10–p90 | tokens/s | MB read/token | floor ms | x floor | "
            "resident MB added | speed-up vs BF16 engine |", "|---|---|---|---|---|---|---|---|---|---|"]
    for threads, res in bench["threads"].items():
        for name, m in res["models"].items():
            speedup = res["models"]["bf16"]["median_ms"] / m["median_ms"]
            added = f"{m['added_bytes'] / 1e6:.0f}" if "added_bytes" in m else "–"
            rows.append(f"| {threads} | {BENCH_LABELS.get(name, name)} | {m['median_ms']:.1f} | "
                        f"{m['p10_ms']:.1f}–{m['p90_ms']:.1f} | {m['tokens_per_s']:.1f} | "
                        f"{m['bytes_per_token'] / 1e6:.0f} | {m['floor_ms']:.1f} | {m['x_floor']:.2f} | {added} | "
                        f"{speedup:.2f}x |")
        rows.append(f"| {threads} | | copy bandwidth {res['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s | | | | | | | "
                    f"INT8/BF16 per round: {', '.join(f'{r:.2f}' for r in res['speedup_per_round'])} |")
    return "\n".join(rows)


def write_card(report: dict, folder: Path) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    rec = report["recipe"]
    sq = report["smoothquant"]
    bar = report["quality_bar"]
    data = ModelCardData(
        base_model=report["base_model"],
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["int8", "smoothquant", "neural-compressor", "optimum-intel", "q8-chat"],
    )
    verdict = ("meets" if bar["met"] else "does **not** meet") + (
        f" the project's quality bar (perplexity ≤ {bar['max_perplexity_ratio']}x BF16, "
        f"top-1 agreement ≥ {bar['min_top1_agreement']})")
    cpu = report["cpu"]
    isa = "/".join(k for k, v in cpu["flags"].items() if v) or "baseline x86-64"
    modules = "\n".join(f"- `{k}`: {v}" for k, v in report["modules"].items())
    text = f"""---
{data.to_yaml()}
---

# {report['base_model'].split('/')[-1]} — INT8 SmoothQuant (Q8-Chat)

INT8 version of [{report['base_model']}](https://huggingface.co/{report['base_model']}) made by Q8-Chat's
`python -m quantize`: Intel Neural Compressor's SmoothQuant recipe through Optimum Intel (`INCQuantizer` +
`PostTrainingQuantConfig`), real INT8 kernels (FBGEMM), verified against BF16 on held-out text. It {verdict}.

## Load it

Q8-Chat's engine (`quantize/engine.py`) reads `engine.safetensors` (no pickle) straight into FBGEMM's INT8
kernels; the quality and speed below are measured on it ({report['quality_eval'].get('int8_engine', 'engine')}).
The same INT8 model for Optimum Intel users:

```python
from optimum.intel import INCModelForCausalLM
model = INCModelForCausalLM.from_pretrained("<this repo or folder>")
model.model.config.return_dict = True; model.model.config.use_cache = True
```

## Recipe: `{rec['name']}`

{rec['description']}

- SmoothQuant: {'applied, alpha ' + str(rec['alpha']) if rec['smooth_quant'] else 'off'}{
    f" — INC: “{sq['inc_log'][0].strip()}”; {sq['norms_rescaled']} of {sq['norms_total']} RMSNorm weights "
    "carry the folded scales" if sq else ''}
- Layers kept out of static INT8: {', '.join(f'`{p}` → {m}' for p, m in rec['tail']) or 'none'}
- Activation calibration: {rec['activation_algorithm']}; INC picks 7-bit activations (reduce_range) by itself on CPUs without VNNI
- Calibration: {report['calibration_samples']} chat conversations written for the project, rendered with the chat
  template, unpadded.
- Modules after quantization:
{modules}

## Measured results

On {report['quality_eval']['eval_tokens']} tokens of held-out English prose, read as the app reads a chat:
windows of {report['quality_eval']['window']} tokens, the first {report['quality_eval']['prefill']} as one prompt,
the rest decoded one token at a time with the KV cache. Chat top-1: on {report['quality_eval']['chat_prompts']}
held-out chat prompts, how often the model picks BF16's token along BF16's own greedy answer. Greedy match = share of {report['quality_eval']['greedy_tokens']}
greedy tokens equal to BF16's before the first difference, on 8 held-out prompts. Speed: greedy decode,
{report['speed']['new_tokens']} new tokens, {report['speed']['prompts']} prompts, {report['speed']['rounds']} rounds,
INT8 and BF16 interleaved in one process.

{summary_table(report)}

Hardware: {cpu['model']} ({isa}; {'native BF16' if cpu['native_bf16'] else 'no native BF16'}),
{cpu['threads']} threads. Numbers from other CPUs will differ; AVX-512 VNNI/AMX machines gain more.

Weights read per token: INT8 {report['speed'].get('weight_bytes', {}).get('int8', 0) / 1e6:.1f} MB, BF16
{report['speed'].get('weight_bytes', {}).get('bf16', 0) / 1e6:.1f} MB; `pytorch_model.bin` {report['disk_bytes'] / 1e6:.1f} MB.

## Speed benchmark

{bench_table(report.get('bench'))}

## Frontier explored

{frontier_table(report['frontier'])}

## Versions

{', '.join(f'{k} {v}' for k, v in report['versions'].items())}. Created {report['created']}.

`pytorch_model.bin` is a pickle (the format INC's loader reads): load it only from a folder you wrote or a Hub
revision pinned by commit hash. `engine.safetensors` holds the same INT8 tensors without code.
"""
    ModelCard(text).save(Path(folder) / "README.md")
