"""python -m quantize.tools.frontier — build every recipe variant on the real default model and measure quality and
speed of each against BF16 in one run; writes quantize/data/frontier.json, which the model card quotes.

Slow (a few minutes per variant on 2 cores): run it alone, nothing else on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from quantize import machine, models
from quantize.maintainer import calibration, card, evaluate, recipe
from quantize.runtime import decoders, latency
from quantize.runtime.decoders import HFDecoder


def int8_weight_share(model: torch.nn.Module) -> float:
    """Share of weight elements held by INT8 modules (static/dynamic Linear, quantized Embedding)."""
    int8, total = 0, 0
    for mod in model.modules():
        kind = type(mod).__module__
        if kind.startswith("torch.ao.nn.quantized") and hasattr(mod, "weight") and callable(mod.weight):
            n = mod.weight().numel()
            int8 += n
            total += n
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            total += mod.weight.numel()
    return int8 / total if total else 0.0


def measure_variants(names: list[str], model_arg: str | None, samples: int, tokens: int, rounds: int) -> dict:
    src = models.resolve_model(model_arg)
    tok, bf16 = models.load_tokenizer(src), models.load_bf16(src)
    reference, bf16_run = HFDecoder(bf16, "transformers BF16"), decoders.open_bf16(src)
    calib = calibration.calibration_ids(tok, samples)
    prompts = [evaluate.prompt_ids(tok, p) for p in evaluate.heldout_prompts()[:2]]
    rows = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix="frontier-"))
        try:  # each variant is saved and served the way the app serves it (the engine where it can)
            res = recipe.quantize_to_folder(bf16, tok, calib, recipe.RECIPES[name], work / "int8")
            int8 = decoders.open_int8(work / "int8")
            quality = evaluate.compare({"bf16": lambda: reference, "int8": lambda m=int8: m}, "bf16", tok)
            q = quality["models"]["int8"]
            s = latency.interleaved({"int8": int8, "bf16": bf16_run}, prompts, tokens, rounds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = {
            "name": name,
            "engine": int8.label,
            "description": recipe.RECIPES[name].description,
            "smoothquant_applied": res.smoothquant.get("applied", False),
            "perplexity_ratio": q["perplexity_ratio"],
            "top1_agreement": q["top1_agreement"],
            "chat_top1_agreement": q["chat_top1_agreement"],
            "greedy_prefix_match": q["greedy_prefix_match"],
            "int8_ms": s["models"]["int8"]["median_ms"],
            "bf16_ms": s["models"]["bf16"]["median_ms"],
            "speedup": s["speedup_median"],
            "speedup_range": [min(s["speedup_per_round"]), max(s["speedup_per_round"])],
            "int8_weight_share": int8_weight_share(res.model),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
        "command": "python -m quantize.tools.frontier " + " ".join(sys.argv[1:]),
        "cpu": machine.describe_cpu().line(),
        "model": str(model_arg or models.DEFAULT_MODEL_LABEL),
        "calibration_samples": samples,
        "bench": {
            "new_tokens": tokens,
            "rounds": rounds,
            "prompts": len(prompts),
            "bf16": bf16_run.label,
        },
        "variants": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize.tools.frontier", description=__doc__)
    p.add_argument(
        "--model",
        default=None,
        help="Hub id or folder (default: the embedded default model)",
    )
    p.add_argument(
        "--variants",
        nargs="*",
        default=list(recipe.RECIPES),
        choices=list(recipe.RECIPES),
    )
    p.add_argument("--calibration-samples", type=int, default=48)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--json",
        type=Path,
        default=card.FRONTIER,
        help=f"output (default {card.FRONTIER})",
    )
    a = p.parse_args(argv)
    result = measure_variants(a.variants, a.model, a.calibration_samples, a.tokens, a.rounds)
    a.json.write_text(json.dumps(result, indent=1))
    print(card.frontier_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
