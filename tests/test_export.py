"""The INT8 model outside the app: the compressed-tensors W8A8 folder the maintainer command writes (`w8a8/`), read
back from its bytes, and served by a real vLLM (its CPU build, in a venv of its own that .ci/run makes)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ANSWER, QUESTION, ROOT
from safetensors.torch import load_file

from quantize.maintainer import evaluate
from quantize.runtime import engine

# What compressed-tensors calls the scheme vLLM's CPU INT8 kernel runs (its QuantizationArgs, as llm-compressor
# writes them): INT8 weights, symmetric, one scale per output channel; INT8 activations, symmetric, one scale per
# token, computed as the model runs.
WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
# The project's quality bar, as issue #2 set it: perplexity at most 1.10x BF16's, top-1 agreement at least 0.85.
MAX_PERPLEXITY_RATIO, MIN_TOP1 = 1.10, 0.85


@pytest.fixture(scope="module")
def folders(int8_run) -> tuple[Path, Path]:
    return int8_run["out"], int8_run["out"] / "w8a8"


def test_the_export_holds_the_recipes_codes_unchanged(folders):
    """Every INT8 Linear's codes and scales are the engine file's, bit for bit; lm_head (listed in `ignore`) is
    its INT8 codes times their scales in BF16; the config names the scheme vLLM runs."""
    int8_dir, w8a8 = folders
    config = json.loads((w8a8 / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "int-quantized")
    (group,) = q["config_groups"].values()
    assert group["weights"] == WEIGHTS and group["input_activations"] == ACTIVATIONS
    assert group["targets"] == ["Linear"] and q["ignore"] == ["lm_head"]
    ours, theirs = load_file(int8_dir / "engine.safetensors"), load_file(w8a8 / "model.safetensors")
    linears = [n.removesuffix(".qweight") for n in ours if n.endswith("proj.qweight")]
    assert len(linears) == 7 * config["num_hidden_layers"]
    for name in linears:
        assert torch.equal(theirs[f"{name}.weight"], ours[f"{name}.qweight"]), name
        assert torch.equal(theirs[f"{name}.weight_scale"], ours[f"{name}.scale"][:, None]), name
    head = ours["lm_head.qweight"].float() * ours["lm_head.scale"][:, None]
    assert torch.equal(theirs["lm_head.weight"], head.bfloat16())
    embed = (
        ours["model.embed_tokens.qweight"].float() - ours["model.embed_tokens.zero_point"][:, None]
    ) * ours["model.embed_tokens.scale"][:, None]
    assert torch.equal(theirs["model.embed_tokens.weight"], embed.bfloat16())
    # nothing else quantized, nothing missing: the rest are the engine file's float tensors, in BF16
    rest = set(theirs) - {f"{n}.{k}" for n in linears for k in ("weight", "weight_scale")}
    assert rest == {n for n in ours if n.endswith(".weight") or n.endswith(".bias")} | {
        "lm_head.weight",
        "model.embed_tokens.weight",
    }


def test_its_tokenizer_reads_and_writes_text_as_the_apps(folders, tokenizer):
    """The export's tokenizer, loaded as any transformers user loads it, gives the app's ids for a chat and gives
    back text with spaces and new lines, not byte-level markers."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folders[1])
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Tokyo.\nIt is big."}]
    ids = tokenizer.apply_chat_template(chat)
    assert theirs.apply_chat_template(chat) == ids
    text = "The capital of Japan is Tokyo.\n\nIt has 14 million people."
    assert theirs.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def vllm_python() -> str:
    """The vLLM venv's Python (.ci/run makes it); a run that requires it (CI) fails without it."""
    python = os.environ.get("Q8CHAT_VLLM_PYTHON", "")
    if not Path(python).is_file():
        if os.environ.get("Q8CHAT_REQUIRE_VLLM"):
            pytest.fail(f"Q8CHAT_VLLM_PYTHON={python!r} is not a Python: .ci/run makes vLLM's venv")
        pytest.skip("no vLLM venv here (Q8CHAT_VLLM_PYTHON): .ci/run makes one")
    return python


def served(python: str, folder: Path, job: dict, tmp_path: Path) -> dict:
    """vLLM's offline engine on `folder`, measured on the job's token ids (quantize/maintainer/vllm_check.py)."""
    job_file, out = tmp_path / "job.json", tmp_path / f"{folder.name}.json"
    job_file.write_text(json.dumps(job))
    run = subprocess.run(
        [python, str(ROOT / "quantize/maintainer/vllm_check.py"), str(folder), str(job_file), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_vllm_serves_the_export(folders, default_dir, tokenizer, tmp_path):
    """vLLM loads the export with its INT8 kernel and answers: its perplexity on the held-out prose (512-token
    windows, one pass each) is within the bar of vLLM's on the BF16 original, with the same token ids; along the
    project's engine's greedy answers (same folder, same prompts), vLLM's first choice is the engine's token at
    least as often as the bar's top-1; and its chat answer comes back as clean text."""
    python = vllm_python()
    int8_dir, w8a8 = folders
    ids = tokenizer(evaluate.heldout_text()).input_ids[:1024]
    prompts = [evaluate.prompt_ids(tokenizer, p)[0].tolist() for p in evaluate.heldout_prompts()]
    ours = engine.load(int8_dir)
    answers = [evaluate.greedy(ours, torch.tensor(p), 32) for p in prompts]
    job = {
        "windows": [w[0].tolist() for w in evaluate.windows(torch.tensor([ids]), 512)],
        "prompts": prompts,
        "greedy_tokens": 32,
        "follow": [[p, a] for p, a in zip(prompts, answers)],
        "chat": [{"role": "user", "content": QUESTION}],
    }
    int8, bf16 = served(python, w8a8, job, tmp_path), served(python, default_dir, job, tmp_path)
    same = sum(a == b for x, y in zip(int8["greedy"], answers) for a, b in zip(x, y)) / sum(map(len, answers))
    figures = {
        "quantization": int8["quantization"],
        "perplexity_ratio": math.exp(int8["nll"] - bf16["nll"]),
        "top1_along_engine": int8["follow_top1"],
        "greedy_same_position": same,
        "chat_answer": int8["chat_answer"],
    }
    print(figures, file=sys.stderr)
    assert int8["quantization"] == "compressed-tensors"
    assert figures["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO, figures
    assert int8["follow_top1"] >= MIN_TOP1, figures
    assert ANSWER in int8["chat_answer"] and not set("ĠĊ") & set(int8["chat_answer"]), figures
    # the card's vLLM row (the pipeline's vllm stage, run by the maintainer command with CI's vLLM venv) says what
    # vLLM measures here, on the same 512-token windows
    row = json.loads((int8_dir / "quantize_report.json").read_text())["quality"]["int8_vllm"]
    assert abs(row["long_perplexity_ratio"] - figures["perplexity_ratio"]) < 0.01, (row, figures)
    card = (int8_dir / "README.md").read_text()
    assert re.search(r"^\| int8_vllm \| – \| – \| – \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", card, re.M), card


def test_vllm_child_sees_none_of_our_secrets_and_its_words_stay_off_the_card(tmp_path, monkeypatch):
    """The vLLM child of the build's vLLM stage, here a stand-in Python that records its environment and fails
    the way a crashing vLLM does (a traceback naming local paths): the child saw no token or key of ours (Hub,
    admin, endpoint), and the error the card will carry names neither the paths nor the traceback, which is kept in a log file of the
    maintainer's cache."""
    from quantize.errors import ModelError
    from quantize.maintainer import vllm_quality

    seen = tmp_path / "env.json"
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\njson.dump(dict(os.environ), open({str(seen)!r}, 'w'))\n"
        "sys.exit('Traceback: /home/maintainer/secret-project/model.py line 3: boom')\n"
    )
    fake.chmod(0o755)
    for name in ("HF_TOKEN", "Q8CHAT_ADMIN_TOKEN", "Q8CHAT_ENDPOINT_API_KEY", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, f"planted-{name}")
    monkeypatch.setenv("Q8CHAT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError) as err:
        vllm_quality.served(str(fake), tmp_path / "w8a8", {})
    child = json.loads(seen.read_text())
    assert not [k for k, v in child.items() if v.startswith("planted-")], sorted(child)
    assert "PATH" in child and child.get("HF_HUB_OFFLINE") == "1"
    assert "/home/maintainer" not in str(err.value) and "boom" not in str(err.value), err.value
    kept = list((tmp_path / "cache" / "logs").glob("vllm-*.log"))  # for the maintainer, on this machine
    assert len(kept) == 1 and "boom" in kept[0].read_text()
