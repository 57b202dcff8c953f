"""python -m quantize — load, calibrate, SmoothQuant to INT8, verify against BF16, write a model card, push.

The stages are quantize/maintainer/pipeline.py: resumable (a rerun with the same arguments picks up after the last finished
stage), and --out is replaced in one step, so it never holds a mix of old and new files.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from quantize import families, files, models
from quantize.errors import ModelError
from quantize.machine import memory_room
from quantize.maintainer import blockwise, card, pipeline, recipe
from quantize.maintainer.evaluate import QUALITY_BAR
from quantize.maintainer.hub import get_token, planned_files, push

EPILOG = """examples:
  python -m quantize --out /tmp/smollm2-int8                      # embedded default model, offline
  python -m quantize --model HuggingFaceTB/SmolLM2-360M-Instruct --out out/360m --alpha 0.6
  python -m quantize --out out/x --push-to-hub me/smollm2-int8 --dry-run   # show what would be pushed
The Hub token comes from HF_TOKEN or `huggingface-cli login`; it is never printed."""


# The command's options: flag -> argparse keywords (--recipe's choices come from recipe.py).
OPTIONS = {
    "--model": dict(default=None, help="Hub repo id or local folder (default: the embedded SmolLM2-135M)"),
    "--revision": dict(default=None, help="Hub revision (branch, tag or commit) of --model"),
    "--out": dict(required=True, type=Path, help="folder to write the INT8 model, report and card into"),
    "--recipe": dict(help="frontier point to build (default %(default)s; see quantize/maintainer/recipe.py)"),
    "--alpha": dict(default=None, help="SmoothQuant alpha in [0, 1], or 'auto' (default: the recipe's)"),
    "--calibration-samples": dict(type=int, default=48, help="chat samples to calibrate on (default 48)"),
    "--calibration-file": dict(
        type=Path,
        default=None,
        help="your own calibration set: JSON chats "
        "([{messages: [...]}]) or plain text (default: the project's chats)",
    ),
    "--eval-file": dict(
        type=Path,
        default=None,
        help="your own held-out set for the quality numbers: JSON chats "
        "or plain text (default: the project's held-out prose and prompts)",
    ),
    "--max-ppl-ratio": dict(
        type=float, help="quality bar: INT8 perplexity at most this times BF16's (default %(default)s)"
    ),
    "--min-top1": dict(
        type=float, help="quality bar: top-1 agreement with BF16 at least this (default %(default)s)"
    ),
    "--tune-trials": dict(
        type=int,
        default=8,
        help="when the recipe misses the bar, Neural Compressor judges up to this many trials of the search "
        "(alpha, then float fallbacks, then calibration size; 1: the recipe alone, unjudged; default %(default)s)",
    ),
    "--tune-minutes": dict(
        type=float, default=60.0, help="time budget of that search in minutes (default %(default)s)"
    ),
    "--bench-tokens": dict(type=int, default=32, help="new tokens per timed generation (default 32)"),
    "--bench-rounds": dict(type=int, default=3, help="interleaved INT8/BF16 rounds (default 3)"),
    "--vllm-python": dict(
        default=os.environ.get("Q8CHAT_VLLM_PYTHON") or None,
        metavar="PYTHON",
        help="the Python of a venv with vLLM (it needs transformers 5, so a venv of its own): measures the "
        "w8a8/ export served by vLLM against vLLM on BF16, the card's vLLM row (default $Q8CHAT_VLLM_PYTHON; "
        "without it, not measured)",
    ),
    "--skip-baseline": dict(action="store_true", help="do not build INT8 without SmoothQuant for comparison"),
    "--push-to-hub": dict(metavar="REPO", default=None, help="push the folder to this Hub model repo"),
    "--push-below-bar": dict(
        action="store_true", help="push even when the INT8 model misses its quality bar"
    ),
    "--private": dict(action="store_true", help="create the Hub repo as private"),
    "--commit-message": dict(default="Upload INT8 SmoothQuant model (q8-chat)"),
    "--dry-run": dict(
        action="store_true", help="with --push-to-hub: list what would be pushed, push nothing"
    ),
    "--overwrite": dict(action="store_true", help="replace an existing, non-empty --out"),
    "--trust-remote-code": dict(action="store_true", help="allow the model repo's own code (off by default)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:

    p = argparse.ArgumentParser(
        prog="python -m quantize",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from_code = {  # defaults that live with the recipe and the quality measure
        "--recipe": dict(default=recipe.DEFAULT_RECIPE, choices=sorted(recipe.RECIPES)),
        "--max-ppl-ratio": dict(default=QUALITY_BAR["max_perplexity_ratio"]),
        "--min-top1": dict(default=QUALITY_BAR["min_top1_agreement"]),
    }
    for flag, keywords in OPTIONS.items():
        p.add_argument(flag, **keywords, **from_code.get(flag, {}))
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be refused before minutes of work is refused here, in one sentence."""

    if args.alpha is not None:
        if args.alpha != "auto":
            try:
                args.alpha = float(args.alpha)
            except ValueError:
                raise ModelError(
                    f"--alpha must be a number in [0, 1] or 'auto', not {args.alpha!r}."
                ) from None
            if not 0.0 <= args.alpha <= 1.0:
                raise ModelError(f"--alpha must be within [0, 1]; got {args.alpha}.")
    if not args.max_ppl_ratio >= 1.0 or not 0.0 <= args.min_top1 <= 1.0:
        raise ModelError("--max-ppl-ratio must be at least 1 and --min-top1 within [0, 1].")
    if args.calibration_samples < 1:
        raise ModelError("--calibration-samples must be at least 1.")
    if args.tune_trials < 1 or not args.tune_minutes > 0:
        raise ModelError("--tune-trials must be at least 1 and --tune-minutes above 0.")
    for flag, path in (("--calibration-file", args.calibration_file), ("--eval-file", args.eval_file)):
        try:
            text = path.read_text() if path is not None else "set"
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"Cannot read the {flag} {path}: {e}.") from None
        if not text.strip() or text.strip() in ("[]", "{}"):
            raise ModelError(f"The {flag} {path} is empty: it needs chats or text.")
    if args.out.exists() and not args.out.is_dir():
        raise ModelError(f"--out {args.out} exists and is a file.")
    model = (
        Path(args.model).expanduser().resolve()
        if args.model and Path(args.model).expanduser().exists()
        else None
    )
    out = args.out.expanduser().resolve()
    if model is not None and (out == model or model in out.parents or out in model.parents):
        raise ModelError(f"--out {args.out} and --model {args.model} overlap: the INT8 folder replaces --out, which "
                         "would delete the model it is made from. Pick an --out outside the model's folder.")  # fmt: skip
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ModelError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it.")
    if args.push_to_hub and not args.dry_run:
        if not get_token():
            raise ModelError("--push-to-hub needs a token: set HF_TOKEN or run `huggingface-cli login`.")


def prepare(args: argparse.Namespace):
    """The run's context: the recipe with --alpha, the BF16 model and its tokenizer, and the record of stages
    a previous run with the same arguments finished. Architectures the recipe cannot smooth stop here."""

    rec = recipe.RECIPES[args.recipe]
    if args.alpha is not None:
        rec = recipe.Recipe(**{**rec.__dict__, "alpha": args.alpha})
    src = models.resolve_model(args.model, revision=args.revision)
    models.refuse_downloaded_pickles(src)
    tok = models.load_tokenizer(src, trust_remote_code=args.trust_remote_code)
    config = models.load_config(src, trust_remote_code=args.trust_remote_code)
    kind = config.model_type
    if kind in families.NOT_SMOOTHABLE:
        raise ModelError(f"Architecture {kind!r} cannot be smoothed: {families.NOT_SMOOTHABLE[kind]}.")
    if kind not in families.FAMILIES:
        raise ModelError(
            f"Architecture {kind!r} is not supported yet: SmoothQuant is verified here for "
            f"{', '.join(sorted(families.FAMILIES))} models (quantize/families.py)."
        )
    blockwise.check_whole_model_room(src, kind, rec, args.tune_trials, memory_room())
    base_id = base_model_id(args.model, str(config._name_or_path))
    files.recover_dir(args.out)  # a run killed inside a two-rename swap left the old folder beside --out
    # created only once the inputs are known to be good
    record = pipeline.Record(args.out.with_name(args.out.name + ".partial"), pipeline.fingerprint(args, src))
    return pipeline.Build(args, rec, record, tok, src, base_id, kind)


def run(args: argparse.Namespace, stage_bar=None) -> int:
    """Check, then every stage (quantize/maintainer/pipeline.py), then the push. `stage_bar` makes the bar over the stages."""
    from tqdm import tqdm

    check_args(args)
    build = prepare(args)
    with (stage_bar or tqdm)(total=len(pipeline.STAGES), desc="quantize", unit="stage") as bar:
        pipeline.run_stages(build, bar)
    report = json.loads((args.out / "quantize_report.json").read_text())
    print(card.summary_table(report))
    print(f"INT8 model written to {args.out}")
    missed, tuning = card.missed_bar(report), report["tuning"]
    if tuning and not tuning["met"] and not args.push_below_bar:
        lead = "Not pushed: tuning ended" if args.push_to_hub else "Tuning ended"
        raise ModelError(
            f"{lead} without a point that meets the bar: {tuning['stopped']}. The best point "
            f"({tuning['chosen']}) misses it ({missed or 'as the search measured it'}) and is in {args.out} "
            "with its card; raise --tune-trials or --tune-minutes, relax the bar, or pass --push-below-bar "
            "to keep it anyway."
        )
    if args.push_to_hub and missed and not args.push_below_bar:
        raise ModelError(
            f"Not pushed: the INT8 model misses its quality bar ({missed}). It is in {args.out}; pass "
            "--push-below-bar to push it anyway, or try another --recipe or --alpha."
        )
    if args.push_to_hub and args.dry_run:
        print(
            f"--dry-run: would push {args.out} to {args.push_to_hub} (private={args.private}) in one commit:"
        )
        for name, size in planned_files(args.out):
            print(f"  {name}  ({size:,} bytes)")
    elif args.push_to_hub:
        print(f"Pushed: {push(args.out, args.push_to_hub, args.private, args.commit_message)}")
    return 0


def disk_full(path: Path, reserve: int = 64 * 2**20) -> bool:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free < reserve


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def base_model_id(model: str | None, name_or_path: str) -> str | None:
    """The Hub id the card names as the base model: the default's, --model's, or a local folder's own recorded
    name when that is a Hub id; None for a folder with none (the card names the folder, not the default)."""

    if not model:
        return models.DEFAULT_MODEL_HUB_ID
    if not Path(model).exists():
        return model
    return name_or_path if HUB_ID.fullmatch(name_or_path) and not Path(name_or_path).exists() else None


def main(argv: list[str] | None = None, stage_bar=None) -> int:
    """The maintainer command. `stage_bar` makes the bar over the pipeline's stages (default tqdm); the app
    passes its own to show a first-start build's progress on the page."""
    logging.basicConfig(
        level=logging.INFO if os.environ.get("Q8CHAT_VERBOSE") else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    args = parse_args(argv)

    start = time.perf_counter()
    try:
        code = run(args, stage_bar)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError from its zip writer, so the disk itself is asked.
        full = getattr(e, "errno", None) in (
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EFBIG,
        ) or disk_full(args.out)
        if not full:
            raise
        # Nothing half-written reaches --out: everything is written under <out>.partial and moved in at the end.
        print(
            f"error: the disk is full while writing under {args.out.parent} ({str(e)[:120]}); {args.out} is "
            f"unchanged. Free some space and rerun the same command: finished stages in {args.out}.partial "
            "are kept.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted; rerun the same command to resume from {args.out}.partial",
            file=sys.stderr,
        )
        return 130
    print(f"done in {time.perf_counter() - start:.0f} s")
    return code
