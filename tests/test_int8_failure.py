"""The INT8 model fails to load (corrupt file, missing file, wrong or unpinned revision): a clear ModelError, and
the app starts anyway, says so, and serves BF16 alone with the comparison marked unavailable."""

import shutil

import pytest
import torch
from conftest import _SESSION, ANSWER, HUB_TOKEN, QUESTION, local_hub, running_app

from app import DEFAULT_SYSTEM
from quantize import models
from quantize.errors import ModelError
from quantize.runtime import decoders
from quantize.runtime.chat import text_of


@pytest.fixture(scope="module")
def broken_int8(int8_run, tmp_path_factory):
    """Copies of the real INT8 folder: one with its weights (INC's pickle and the engine's safetensors) cut in
    half, one without them."""
    root = tmp_path_factory.mktemp("broken")
    corrupt, missing = root / "corrupt", root / "missing"
    shutil.copytree(int8_run["out"], corrupt)
    shutil.copytree(int8_run["out"], missing)
    for name in ("pytorch_model.bin", "engine.safetensors"):
        weights = corrupt / name
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        (missing / name).unlink()
    return {"corrupt": corrupt, "missing": missing}


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
@pytest.mark.parametrize("load", [models.load_inc_int8, decoders.open_int8])
def test_broken_folder_is_a_clear_error(broken_int8, kind, load):
    with pytest.raises(ModelError, match="Cannot load the INT8 model"):
        load(broken_int8[kind])


def test_hub_int8_needs_a_commit_pin():
    for revision in (None, "main", "v1.0"):
        with pytest.raises(ModelError, match="commit hash"):
            models.resolve_int8("test-user/smollm2-int8", revision=revision)


def test_hub_int8_at_a_pinned_commit_loads_and_a_wrong_one_is_refused(int8_run):
    """The repo the maintainer command pushed (conftest.int8_run), served again by the local Hub-API server."""
    repo = int8_run["repo"]
    with local_hub(_SESSION / "hub-int8") as hub:
        head = hub.head(repo)
        path = models.resolve_int8(repo, revision=head, token=HUB_TOKEN)
        model = decoders.open_int8(path)
        assert model.forward(torch.tensor([1, 2, 3]), model.new_cache(8)).shape[-1] > 1000
        with pytest.raises(ModelError, match="no revision"):
            models.resolve_int8(repo, revision="0" * 40, token=HUB_TOKEN)


@pytest.mark.slow
def test_app_serves_bf16_alone_when_int8_fails(broken_int8, tmp_path):
    from gradio_client import Client
    from test_app_server import app_page

    with running_app(tmp_path / "app-broken-int8.log", Q8CHAT_INT8_MODEL=str(broken_int8["corrupt"])) as (
        url,
        _,
    ):
        client = Client(url, verbose=False)
        s = client.predict(api_name="/status")
        assert s["ready"] and not s["compare"] and "Cannot load the INT8 model" in s["int8_error"]
        assert (
            str(broken_int8["corrupt"].parent) not in s["int8_error"]
        )  # a visitor never sees where files lie
        h, box, _chart, table, bf16, _notice, *_ = client.predict(
            QUESTION, [], DEFAULT_SYSTEM, 16, 0.0, 0.95, True, api_name="/chat"
        )
        assert ANSWER in text_of(h[-1]["content"])
        assert "Comparison unavailable" in table
        errors: list[str] = []
        with app_page(url, errors, header="INT8 unavailable") as page:
            header = page.locator("#header").inner_text()
            assert "BF16" in header and str(broken_int8["corrupt"].parent) not in header
        assert not errors, errors
