"""The export's quality where it is served: vLLM (its CPU build, in its own venv) on `w8a8/` against vLLM on the
BF16 original, on the quality stage's held-out text and prompts. The card's `int8_vllm` row.

vLLM reads each window in one pass, as the engine's long-prompt mode does (evaluate.LONG_WINDOW tokens), so the row
fills those columns; its chat top-1 follows vLLM BF16's greedy answers, as the engine's follows transformers'. Each
side runs maintainer/vllm_check.py in a child process of the vLLM venv's Python.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

from quantize import models
from quantize.errors import ModelError
from quantize.maintainer import evaluate
from quantize.runtime.prefixes import common_prefix

log = logging.getLogger(__name__)
CHECK = Path(__file__).with_name("vllm_check.py")
VENV_ENV = "Q8CHAT_VLLM_PYTHON"  # the vLLM venv's Python (.ci/run makes one); --vllm-python
# What the vLLM child sees of our environment: what a Python process and vLLM's CPU backend need, nothing of ours
# (no Hub token, admin token or endpoint key: it reads local folders only)
CHILD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "HF_HOME")
CHILD_ENV_PREFIXES = (
    "VLLM_",
    "OMP_",
    "KMP_",
    "ONEDNN_",
    "DNNL_",
    "MKL_",
    "FBGEMM_",
    "ATEN_",
    "LD_",
    "TORCH",
    "XDG_",
)


def served(python: str, folder: Path, job: dict, timeout: float = 1800) -> dict:
    """vLLM's offline engine on `folder`, measured on the job's token ids (maintainer/vllm_check.py)."""
    with tempfile.TemporaryDirectory(prefix="q8-vllm-") as tmp:
        job_file, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k in CHILD_ENV or k.startswith(CHILD_ENV_PREFIXES)}
        env["HF_HUB_OFFLINE"] = "1"
        try:
            run = subprocess.run([python, str(CHECK), str(folder), str(job_file), str(out)], capture_output=True,
                                 text=True, timeout=timeout, cwd=tmp, env=env)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelError(f"vLLM could not serve {folder.name}: {type(e).__name__}") from None
        if run.returncode != 0:  # its words (tracebacks, local paths) stay on this machine, never on the card
            saved = models.cache_dir() / "logs" / f"vllm-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(run.stderr)
            log.warning("vLLM's output on %s is in %s", folder.name, saved)
            raise ModelError(f"vLLM could not serve {folder.name} (exit code {run.returncode})")
        return json.loads(out.read_text())


def measure(python: str, w8a8: Path, bf16_dir: Path, tokenizer, held: evaluate.HeldOut) -> dict:
    """The int8_vllm row: long-prompt perplexity ratio and top-1 against vLLM BF16, chat top-1 along vLLM BF16's
    greedy answers, greedy match, and what vLLM ran."""
    ids = tokenizer(held.text, return_tensors="pt").input_ids[:, :1024]  # what evaluate.compare reads
    windows = [w[0].tolist() for w in evaluate.windows(ids, evaluate.LONG_WINDOW)]
    prompts = [evaluate.prompt_ids(tokenizer, p)[0].tolist() for p in held.prompts]
    # evaluate.compare's greedy length, so the greedy match compares like with like
    job = {"windows": windows, "prompts": prompts, "greedy_tokens": 48, "follow": [], "chat": None}
    bf16 = served(python, bf16_dir, job)
    answers = bf16["greedy"]
    int8 = served(python, w8a8, job | {"follow": [[p, a] for p, a in zip(prompts, answers)]})
    same = [a == b for a, b in zip(int8["top"], bf16["top"])]
    prefix = [common_prefix(a, b) / max(len(b), 1) for a, b in zip(int8["greedy"], answers)]
    return {
        "perplexity": None,  # the short-window mode is the engine's decode loop; vLLM reads whole windows
        "perplexity_ratio": None,
        "top1_agreement": None,
        "long_perplexity": math.exp(int8["nll"]),
        "long_perplexity_ratio": math.exp(int8["nll"] - bf16["nll"]),
        "long_top1_agreement": sum(same) / len(same),
        "chat_top1_agreement": int8["follow_top1"],
        "greedy_prefix_match": sum(prefix) / len(prefix),
        "engine": f"vLLM {int8['vllm']} ({int8['quantization']})",
    }
