"""python -m quantize — load, calibrate, SmoothQuant to INT8, verify against BF16, write a model card, push.

Stages are resumable: each finished stage is recorded in <out>.partial/stages.json with a fingerprint of the
arguments, and a rerun with the same arguments picks up after the last finished stage. The final folder appears
at --out in one rename, so --out never holds a mix of old and new files.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("q8chat")

EPILOG = """examples:
  python -m quantize --out /tmp/smollm2-int8                      # embedded default model, offline
  python -m quantize --model HuggingFaceTB/SmolLM2-360M-Instruct --out out/360m --alpha 0.6
  python -m quantize --out out/x --push-to-hub me/smollm2-int8 --dry-run   # show what would be pushed
The Hub token comes from HF_TOKEN or `huggingface-cli login`; it is never printed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from quantize.recipe import DEFAULT_RECIPE, RECIPES

    p = argparse.ArgumentParser(prog="python -m quantize", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub repo id or local folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--out", required=True, type=Path, help="folder to write the INT8 model, report and card into")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES), help="frontier point to build "
                   f"(default {DEFAULT_RECIPE}; see quantize/recipe.py)")
    p.add_argument("--alpha", default=None, help="SmoothQuant alpha in [0, 1], or 'auto' (default: the recipe's)")
    p.add_argument("--calibration-samples", type=int, default=48, help="chat samples to calibrate on (default 48)")
    p.add_argument("--calibration-file", type=Path, default=None, help="JSON list of {messages: [...]} chats")
    p.add_argument("--bench-tokens", type=int, default=32, help="new tokens per timed generation (default 32)")
    p.add_argument("--bench-rounds", type=int, default=3, help="interleaved INT8/BF16 rounds (default 3)")
    p.add_argument("--skip-baseline", action="store_true", help="do not build INT8 without SmoothQuant for comparison")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="push the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--commit-message", default="Upload INT8 SmoothQuant model (q8-chat)")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be pushed, push nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own code (off by default)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be refused before minutes of work is refused here, in one sentence."""
    from quantize.models import ModelError

    if args.alpha is not None:
        if args.alpha != "auto":
            try:
                args.alpha = float(args.alpha)
            except ValueError:
                raise ModelError(f"--alpha must be a number in [0, 1] or 'auto', not {args.alpha!r}.") from None
            if not 0.0 <= args.alpha <= 1.0:
                raise ModelError(f"--alpha must be within [0, 1]; got {args.alpha}.")
    if args.calibration_samples < 1:
        raise ModelError("--calibration-samples must be at least 1.")
    if args.calibration_file is not None:
        from quantize.calibration import load_chats

        try:
            chats = load_chats(args.calibration_file)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"Cannot read the calibration file {args.calibration_file}: {e}.") from None
        if not chats:
            raise ModelError(f"The calibration file {args.calibration_file} is empty: it needs chat samples.")
    if args.out.exists() and not args.out.is_dir():
        raise ModelError(f"--out {args.out} exists and is a file.")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ModelError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it.")
    if args.push_to_hub and not args.dry_run:
        from quantize.hub import get_token

        if not get_token():
            raise ModelError("--push-to-hub needs a token: set HF_TOKEN or run `huggingface-cli login`.")


def fingerprint(args: argparse.Namespace) -> str:
    keys = ["model", "revision", "recipe", "alpha", "calibration_samples", "calibration_file", "bench_tokens",
            "bench_rounds", "skip_baseline"]
    blob = json.dumps({k: str(getattr(args, k)) for k in keys}, sort_keys=True)
    # a code change (recipe, evaluation) must not resume onto stages an older version produced
    code = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))
                    if p.name not in ("bench.py", "frontier.py"))  # tools that only read the result
    return hashlib.sha256(blob.encode() + code).hexdigest()[:16]


class Stages:
    """Which stages of this exact run are done, kept in <out>.partial/stages.json."""

    def __init__(self, partial: Path, key: str) -> None:
        self.file = partial / "stages.json"
        state = json.loads(self.file.read_text()) if self.file.is_file() else {}
        if state.get("fingerprint") != key:
            shutil.rmtree(partial, ignore_errors=True)
            state = {"fingerprint": key, "done": {}}
        partial.mkdir(parents=True, exist_ok=True)
        self.state = state

    def get(self, name: str):
        return self.state["done"].get(name)

    def done(self, name: str, value) -> None:
        self.state["done"][name] = value
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.file)


def run(args: argparse.Namespace, stage_bar=None) -> int:
    from tqdm import tqdm

    from quantize import calibration, card, models, recipe
    from quantize.hub import planned_files, push

    check_args(args)
    rec = recipe.RECIPES[args.recipe]
    if args.alpha is not None:
        rec = recipe.Recipe(**{**rec.__dict__, "alpha": args.alpha})
    out: Path = args.out

    src = models.resolve_model(args.model, revision=args.revision)
    tok = models.load_tokenizer(src, trust_remote_code=args.trust_remote_code)
    bf16 = models.load_bf16(src, trust_remote_code=args.trust_remote_code)
    if bf16.config.model_type not in recipe.SUPPORTED_MODEL_TYPES:
        raise models.ModelError(
            f"Architecture {bf16.config.model_type!r} is not supported: the recipe is verified for "
            f"{', '.join(sorted(recipe.SUPPORTED_MODEL_TYPES))} models.")
    base_id = args.model if args.model and not Path(args.model).exists() else models.DEFAULT_MODEL_HUB_ID
    if args.model and Path(args.model).exists():
        base_id = bf16.config.name_or_path if "/" in str(bf16.config._name_or_path) else base_id
    calib_file = args.calibration_file or calibration.CHATS
    partial = out.with_name(out.name + ".partial")  # created only once the inputs are known to be good
    stages = Stages(partial, fingerprint(args))
    int8_dir = partial / "int8"
    with (stage_bar or tqdm)(total=6, desc="quantize", unit="stage") as steps:
        report = _stages(args, rec, stages, steps, tok, bf16, src, base_id, calib_file, int8_dir)
    print(card.summary_table(report))
    print(f"INT8 model written to {out}")

    if args.push_to_hub:
        if args.dry_run:
            print(f"--dry-run: would push {out} to {args.push_to_hub} (private={args.private}) in one commit:")
            for name, size in planned_files(out):
                print(f"  {name}  ({size:,} bytes)")
        else:
            print(f"Pushed: {push(out, args.push_to_hub, args.private, args.commit_message)}")
    return 0


def _stages(args, rec, stages: Stages, steps, tok, bf16, src, base_id: str, calib_file: Path, int8_dir: Path) -> dict:
    from tqdm import tqdm

    from quantize import calibration, card, evaluate, latency, models, recipe
    from quantize.generate import HFDecoder

    out: Path = args.out
    partial = int8_dir.parent

    if not stages.get("quantize"):
        steps.set_description("quantize: calibrate + SmoothQuant INT8")
        calib = calibration.calibration_ids(tok, args.calibration_samples, calib_file)
        result = recipe.quantize(bf16, calib, rec, partial / "inc-work")
        if rec.smooth_quant and not result.smoothquant.get("applied"):
            raise RuntimeError(f"SmoothQuant was not applied (INC said: {result.smoothquant.get('inc_log')}).")
        recipe.save_int8(result, int8_dir, tok, bf16)
        shutil.rmtree(partial / "inc-work", ignore_errors=True)
        stages.done("quantize", {**result.summary(), "calibration_samples": len(calib)})
        del result
    steps.update(1)

    if not args.skip_baseline and not stages.get("baseline"):
        steps.set_description("baseline: INT8 without SmoothQuant")
        calib = calibration.calibration_ids(tok, args.calibration_samples, calib_file)
        base = recipe.quantize(bf16, calib, recipe.RECIPES[recipe.BASELINE_NO_SQ], partial / "inc-base")
        q = evaluate.compare({"bf16": HFDecoder(bf16, "BF16"), "int8_no_sq": HFDecoder(base.model, "INT8 no SQ")},
                             "bf16", tok)
        shutil.rmtree(partial / "inc-base", ignore_errors=True)
        stages.done("baseline", {"recipe": recipe.BASELINE_NO_SQ, **q["models"]["int8_no_sq"]})
        del base
    steps.update(1)

    int8 = models.open_int8(int8_dir)  # verify what ships: the folder, loaded the way the app serves it
    if not stages.get("quality"):
        steps.set_description("verify: perplexity, top-1, greedy match")
        q = evaluate.compare({"bf16": HFDecoder(bf16, "transformers BF16"), "int8": int8}, "bf16", tok)
        stages.done("quality", {**q, "int8_engine": int8.label})
    steps.update(1)

    if not stages.get("speed"):
        steps.set_description("verify: INT8 vs BF16 decode, interleaved")
        prompts = [evaluate.prompt_ids(tok, p) for p in evaluate.heldout_prompts()[:2]]
        bf16_run = models.open_bf16(src, trust_remote_code=args.trust_remote_code)  # the INT8 model's loop
        with tqdm(total=args.bench_rounds * len(prompts) * 2, desc="timing", leave=False) as bar:
            speed = latency.interleaved({"int8": int8, "bf16": bf16_run}, prompts, args.bench_tokens,
                                        args.bench_rounds, progress=bar)
        speed["cpu"] = latency.describe_cpu().asdict()
        speed["weight_bytes"] = {"int8": int8.weight_bytes, "bf16": bf16_run.weight_bytes}
        speed["engines"] = {"int8": int8.label, "bf16": bf16_run.label}
        stages.done("speed", speed)
    steps.update(1)

    steps.set_description("model card")
    report = card.build_report(stages.state["done"], rec, base_id=base_id, source=str(src), int8_dir=int8_dir)
    (int8_dir / "quantize_report.json").write_text(json.dumps(report, indent=1))
    card.write_card(report, int8_dir)
    steps.update(1)

    if out.exists():  # swap in one rename; the old folder is only deleted once the new one is in place
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(int8_dir, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(int8_dir, out)
    shutil.rmtree(partial, ignore_errors=True)
    steps.update(1)
    return report


def disk_full(path: Path, reserve: int = 64 * 2**20) -> bool:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free < reserve


def main(argv: list[str] | None = None, stage_bar=None) -> int:
    """The maintainer command. `stage_bar` makes the bar over the pipeline's stages (default tqdm); the app
    passes its own to show a first-start build's progress on the page."""
    logging.basicConfig(level=logging.INFO if os.environ.get("Q8CHAT_VERBOSE") else logging.WARNING,
                        format="%(levelname)s %(message)s")
    args = parse_args(argv)
    from quantize.models import ModelError

    start = time.perf_counter()
    try:
        code = run(args, stage_bar)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError from its zip writer, so the disk itself is asked.
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or disk_full(args.out)
        if not full:
            raise
        # Nothing half-written reaches --out: everything is written under <out>.partial and moved in at the end.
        print(f"error: the disk is full while writing under {args.out.parent} ({str(e)[:120]}); {args.out} is "
              f"unchanged. Free some space and rerun the same command: finished stages in {args.out}.partial "
              "are kept.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume from {args.out}.partial", file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
