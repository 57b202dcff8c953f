"""Bad input to `python -m quantize` gets one clear sentence, a non-zero exit, and touches nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_LLAMA, local_hub, run_cli, wait_for

from quantize import files


def _error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_help_explains_the_command():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--out",
        "--alpha",
        "--calibration-samples",
        "--push-to-hub",
        "--private",
        "--commit-message",
        "--dry-run",
        "--overwrite",
    ):
        assert flag in proc.stdout


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "abc"])
def test_alpha_outside_unit_interval(tmp_path, alpha):
    assert "--alpha" in _error(run_cli("--out", str(tmp_path / "o"), "--alpha", alpha))
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "--overwrite" in _error(run_cli("--out", str(out)))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_unknown_hub_model_offline_makes_no_request(tmp_path):
    """Offline (HF_HUB_OFFLINE=1), a Hub id is refused in one sentence without a request to the Hub that
    HF_ENDPOINT names (a LocalHub listening there counts them); online, the same command does ask it."""
    args = ("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o"))
    with local_hub(tmp_path / "hub") as hub:
        msg = _error(run_cli(*args, env={"HF_HUB_OFFLINE": "1"}))
        assert hub.requests == [] and hub.connections == 0
        assert "HF_HUB_OFFLINE is set" in msg and "'no-such-org/no-such-model'" in msg

        online = _error(run_cli(*args))
        assert "No model 'no-such-org/no-such-model'" in online
        assert hub.requests and hub.connections > 0
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hi")
    assert "not a model folder" in _error(
        run_cli("--model", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o"))
    )


def test_missing_folder(tmp_path):
    assert "does not exist" in _error(
        run_cli("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    )


def test_unsupported_architecture(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(folder)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    )
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    msg = _error(run_cli("--model", str(folder), "--out", str(tmp_path / "o")))
    assert "'gpt2' is not supported" in msg
    assert not (tmp_path / "o").exists()


def test_missing_token_for_push(tmp_path):
    msg = _error(run_cli("--out", str(tmp_path / "o"), "--push-to-hub", "me/x", env={"HF_TOKEN": ""}))
    assert "token" in msg and "HF_TOKEN" in msg


def test_empty_calibration_set(tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([]))
    assert "calibration" in _error(run_cli("--out", str(tmp_path / "o"), "--calibration-file", str(calib)))
    assert not (tmp_path / "o").exists()


def test_stages_resume_only_the_same_run(tmp_path):
    import argparse

    from quantize.maintainer.pipeline import Record, fingerprint

    args = argparse.Namespace(
        model=None,
        revision=None,
        recipe="sq-dynamic",
        alpha=None,
        calibration_samples=48,
        calibration_file=None,
        eval_file=None,
        bench_tokens=32,
        bench_rounds=3,
        skip_baseline=False,
        max_ppl_ratio=1.1,
        min_top1=0.85,
        tune_trials=8,
        tune_minutes=60.0,
    )
    source, partial = tmp_path / "model", tmp_path / "out.partial"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    Record(partial, fingerprint(args, source)).add("quantize", {"seconds": 1})
    assert Record(partial, fingerprint(args, source)).done == {"quantize": {"seconds": 1}}  # a rerun resumes
    args.alpha = 0.7
    assert Record(partial, fingerprint(args, source)).done == {}  # other arguments start over
    Record(partial, fingerprint(args, source)).add("quantize", {"seconds": 1})
    (source / "model.safetensors").write_bytes(b"other weights")  # the same folder, new weights
    assert Record(partial, fingerprint(args, source)).done == {}
    Record(partial, fingerprint(args, source)).add("quantize", {"seconds": 1})
    args.calibration_file = tmp_path / "chats.txt"
    args.calibration_file.write_text("one text")
    key = fingerprint(args, source)
    args.calibration_file.write_text("another text")  # the same file name, new calibration
    assert fingerprint(args, source) != key


def test_an_out_that_overlaps_the_model_is_refused_before_anything_is_touched(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out in (model, model / "int8", tmp_path):
        proc = run_cli("--model", str(model), "--out", str(out), "--overwrite")
        assert proc.returncode == 2 and "overlap" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (model / "config.json").read_text() == "{}"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: enough for the stage records, too small for the INT8 weights."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_model(tmp_path, tokenizer):
    """A random two-layer Llama with the default tokenizer: the whole CLI runs on it in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model


FAST = ("--skip-baseline", "--calibration-samples", "4", "--bench-tokens", "4", "--bench-rounds", "1")


def test_disk_full_while_saving(small_disk, tiny_model):
    out = small_disk / "o"
    msg = _error(run_cli("--model", str(tiny_model), "--out", str(out), *FAST, timeout=900))
    assert "disk is full" in msg and "rerun the same command" in msg
    assert not out.exists()  # nothing half-written where the app looks for the model


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the export's `w8a8/` too), by its path there."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_overwrite_never_mixes_old_and_new(tmp_path, tiny_model):
    """--overwrite replaces --out in one rename: killed halfway, the old folder is intact; finished, no old
    file is left."""
    import signal
    import subprocess

    out = tmp_path / "o"
    assert run_cli("--model", str(tiny_model), "--out", str(out), *FAST).returncode == 0
    (out / "old-only.txt").write_text("from the first run")
    before = contents(out)

    args = ["--model", str(tiny_model), "--out", str(out), "--overwrite", "--alpha", "0.7", *FAST]
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantize", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = out.with_name("o.partial")
    wait_for(lambda: partial.exists() or proc.poll() is not None, 300, "the rerun to start writing")
    assert proc.poll() is None, "the rerun finished before it could be killed"  # killed once under way
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert contents(out) == before

    # killed again as the new folder is finished, when it is moved into place: --out is one whole version
    proc = subprocess.Popen([sys.executable, "-m", "quantize", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    card = partial / "int8" / "quantize_report.json"
    wait_for(lambda: card.exists() or proc.poll() is not None, 600, "the rerun to write its card")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    files.recover_dir(out)  # what the next command does first
    now = contents(out)
    whole_new = (
        "old-only.txt" not in now and json.loads(now["quantize_report.json"])["recipe"]["alpha"] == 0.7
    )
    assert now == before or whole_new, sorted(now)

    assert run_cli(*args).returncode == 0
    after = contents(out)
    assert "old-only.txt" not in after and not partial.exists()
    assert json.loads(after["quantize_report.json"])["recipe"]["alpha"] == 0.7


# Runs `python -m quantize ...` as its child and writes the child's peak resident memory (wait4's rusage) to
# $PEAK_FILE. The child is forked from this small launcher, so the count is the run's own: a process started
# straight from pytest would carry pytest's high-water mark into its count.
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "quantize", *sys.argv[1:]])
_, status, usage = os.wait4(child.pid, 0)
open(os.environ["PEAK_FILE"], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))"""


def run_cli_with_peak(*args: str, env: dict, peak_file) -> tuple[subprocess.CompletedProcess, int]:
    import sys

    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env, "PEAK_FILE": str(peak_file)})  # fmt: skip
    return proc, int(peak_file.read_text())


@pytest.mark.slow  # two full runs of the command on a tiny model
def test_speed_is_int8_alone_when_the_pair_does_not_fit(tmp_path, tiny_model):
    """The app's rule in the quantize step: a BF16 model and its INT8 copy that do not fit in memory together (a
    7B pair on a 24 GB machine) are not loaded together to be timed; INT8's own speed is, and the card says why."""
    bf16 = sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))
    for cap, timed in ((None, {"int8", "bf16"}), (bf16, {"int8"})):  # the second: room for one of the two
        out = tmp_path / f"o-{cap}"
        env = {"Q8CHAT_MEMORY_BYTES": str(cap)} if cap else {}
        assert run_cli("--model", str(tiny_model), "--out", str(out), *FAST, env=env).returncode == 0
        speed = json.loads((out / "quantize_report.json").read_text())["speed"]["models"]
        assert set(speed) == timed and speed["int8"]["median_ms"] > 0
    card = (out / "README.md").read_text()
    assert "INT8 alone" in card and f"its {bf16 / 1e9:.2f} GB of weights" in card


@pytest.mark.slow  # two full runs of the command on a tiny model
def test_a_model_below_its_bar_is_not_pushed_unless_asked(tmp_path, tiny_model):
    """A bar the model cannot meet (perplexity at most 1.0x BF16's and top-1 1.0, for a random tiny model's INT8):
    the folder is written, nothing reaches the Hub, and the sentence says which bar failed by how much. With
    --push-below-bar the same run pushes. The report's peak memory is the one the kernel counted for the run."""
    from conftest import HUB_TOKEN

    out, repo = tmp_path / "o", "test-user/below-bar"
    args = [
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        *FAST,
        "--max-ppl-ratio",
        "1.0",
        "--min-top1",
        "1.0",
        "--tune-trials",
        "1",
    ]
    with local_hub(tmp_path / "hub") as hub:
        refused, peak = run_cli_with_peak(
            *args, "--push-to-hub", repo, env={"HF_TOKEN": HUB_TOKEN}, peak_file=tmp_path / "peak"
        )
        msg = _error(refused)
        assert "Not pushed: the INT8 model misses its quality bar" in msg and "--push-below-bar" in msg
        report = json.loads((out / "quantize_report.json").read_text())
        q = report["quality"]["int8"]  # the perplexity ratio of a random model may be < 1
        top1 = min(q["top1_agreement"], q["long_top1_agreement"])  # the bar holds for both modes
        assert top1 < 1.0 and f"top-1 agreement {top1:.3f}, below 1.0" in msg
        assert hub.head(repo) is None and not [p for method, p in hub.requests if method != "GET"]
        assert "does **not** meet" in (out / "README.md").read_text()
        assert abs(report["peak_rss_bytes"] / peak - 1) < 0.1, (report["peak_rss_bytes"], peak)

        pushed = run_cli(
            *args, "--overwrite", "--push-to-hub", repo, "--push-below-bar", env={"HF_TOKEN": HUB_TOKEN}
        )
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        assert set(hub.files(repo)) >= {"README.md", "engine.safetensors", "quantize_report.json"}


@pytest.mark.slow  # two full runs of the command on a tiny model
def test_maintainers_own_calibration_text_and_eval_chats(tmp_path, tiny_model, tokenizer):
    """--calibration-file as plain text (cut into 512-token pieces) and --eval-file as JSON chats: the quality
    numbers are measured on those chats (their user turns as prompts, all turns as prose), and the card says so."""
    # any long English text will do as a calibration file
    from quantize.maintainer.evaluate import heldout_text

    calib = tmp_path / "my-calibration.txt"
    calib.write_text(heldout_text())
    chats = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 12}]}
             for i in range(5)]  # fmt: skip
    evalf = tmp_path / "my-eval.json"
    evalf.write_text(json.dumps(chats))
    out = tmp_path / "o"
    proc = run_cli("--model", str(tiny_model), "--out", str(out), *FAST, "--calibration-file", str(calib),
                   "--eval-file", str(evalf))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "quantize_report.json").read_text())
    prose = "\n\n".join(m["content"] for c in chats for m in c["messages"])
    assert report["quality_eval"]["eval_tokens"] == min(len(tokenizer(prose).input_ids), 1024)
    assert report["quality_eval"]["chat_prompts"] == 5 and "my-eval.json" in report["quality_eval"]["source"]
    pieces = -(-len(tokenizer(heldout_text(), add_special_tokens=False).input_ids) // 512)
    assert (
        report["calibration_samples"] == min(pieces, 4)
        and "my-calibration.txt" in report["calibration_source"]
    )
    card = (out / "README.md").read_text()
    assert "my-eval.json" in card and "my-calibration.txt" in card

    missing = _error(run_cli("--out", str(tmp_path / "p"), "--eval-file", str(tmp_path / "absent.txt")))
    assert "--eval-file" in missing and "absent.txt" in missing


# The command as it runs a model above the size where the block path starts (a tiny model stands in for a 7B one)
ABOVE_BLOCK_SIZE = """import sys
from quantize.maintainer import blockwise
blockwise.WHOLE_MODEL_MAX_PARAMS = 0
from quantize.maintainer.cli import main
sys.exit(main(sys.argv[1:]))"""


@pytest.mark.parametrize(
    "family, trials, why",
    [
        ("llama", "8", "--tune-trials 1 builds it block by block"),
        ("llama", "1", None),  # the block path: its own estimate, made from one block, decides
        ("bloom", "1", None),  # every family takes it
    ],
)
def test_a_large_model_that_would_be_quantized_whole_is_refused_before_the_work(
    tmp_path, tokenizer, family, trials, why
):
    """A model too large for INC's whole-model path in this memory (a 7B one needs about 86 GB that way) stops at
    once in one sentence that says why it is not built block by block, with nothing written."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    size = {"hidden_size": 64, "n_layer": 2, "n_head": 4} if family == "bloom" else TINY_LLAMA
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **size)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    out = tmp_path / "o"
    args = ["--model", str(tmp_path / "bf16"), "--out", str(out), "--tune-trials", trials, *FAST]
    proc = subprocess.run([sys.executable, "-c", ABOVE_BLOCK_SIZE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "Q8CHAT_MEMORY_BYTES": str(10**9)})  # fmt: skip
    msg = _error(proc)
    if why is None:
        assert "Quantizing this model block by block needs about" in msg and "1.0 GB are available" in msg
    else:
        assert "model whole needs about" in msg and "1 GB are available" in msg and why in msg
        assert not out.exists() and not out.with_name("o.partial").exists()


FINGERPRINT = """
import sys
from quantize.maintainer.cli import parse_args
from quantize.maintainer.pipeline import fingerprint
print(fingerprint(parse_args(["--out", "x"]), sys.argv[1]))
"""


def test_a_change_to_the_build_code_starts_over_and_one_to_the_page_does_not(tmp_path):
    """The fingerprint a rerun resumes by, computed on a copy of the package as a file in it changes: the
    maintainer step's code (subfolders too) and what it imports start over; the page's code and the tools do
    not."""
    shutil.copytree(ROOT / "quantize", tmp_path / "quantize", ignore=shutil.ignore_patterns("__pycache__"))

    def key() -> str:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        proc = subprocess.run(
            [sys.executable, "-c", FINGERPRINT, str(ROOT / "assets")],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def touch(name: str) -> None:
        path = tmp_path / "quantize" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((path.read_text() if path.exists() else "") + "\n# changed\n")

    first = key()
    for page in ("runtime/panel.py", "runtime/chat.py", "runtime/serving.py", "tools/bench.py"):
        touch(page)
    assert key() == first
    seen = {first}
    # runtime/prefixes.py: the step imports common_prefix from it (a fixed list of the page's files left it out)
    built = (
        "maintainer/recipe.py",
        "runtime/engine.py",
        "runtime/prefixes.py",
        "families.py",
        "maintainer/x/y.py",
    )
    for build in built:
        touch(build)
        seen.add(key())
    assert len(seen) == len(built) + 1  # each change gave a new fingerprint
