"""What the app serves: the configured model pairs (a BF16 model and its INT8 copy), loading one pair in the
background, building its INT8 copy on a first start while BF16 already answers, and switching pairs.

Configuration (environment):
  Q8CHAT_BF16_MODEL / Q8CHAT_INT8_MODEL / Q8CHAT_INT8_REVISION  the first pair (default: the embedded model, its
                                                                INT8 copy built on first start and cached)
  Q8CHAT_MODELS   a JSON file with more pairs: [{"name": ..., "bf16": ..., "int8": ..., "revision": ...}]
                  (or "int8_endpoint" and "bf16_endpoint" for a pair served elsewhere);
                  a pair whose models are on the Hub is offered only when the Hub answers
  Q8CHAT_INT8_ENDPOINT / Q8CHAT_BF16_ENDPOINT  OpenAI-compatible servers (vLLM serving the export and its BF16
                  original) that answer instead of models loaded here (runtime/remote.py); the first pair's
                  BF16 model then gives only its tokenizer. Q8CHAT_ENDPOINT_API_KEY, Q8CHAT_ENDPOINT_TIMEOUT_S
  Q8CHAT_THREADS  torch threads (default: all cores)
  Q8CHAT_MEMORY_BYTES  memory the two models, then their caches, may take (default: what the OS and the container's
                       cgroup leave)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from quantize import machine, models
from quantize.errors import ModelError
from quantize.machine import settled_rss, why_pair_does_not_fit
from quantize.runtime import chat, decoders, kernels, remote

log = logging.getLogger("q8chat")
# The app decodes its replies together (chat.SLOTS > 1): the INT8 engine may run several rows on oneDNN, from a
# second copy of its large Linears' weights (engine.load), where memory has room for it (serve_int8).
BATCHED = chat.SLOTS > 1


@dataclass(frozen=True)
class Pair:
    """A BF16 model and its INT8 copy, as configured. None means the embedded default (bf16), or the INT8
    copy this app builds from the BF16 model on first start and caches (int8)."""

    name: str
    bf16: str | None = None
    int8: str | None = None
    revision: str | None = None  # the commit a Hub INT8 model is pinned to
    int8_endpoint: str | None = None  # a server that answers for INT8 instead (runtime/remote.py)
    bf16_endpoint: str | None = None


@dataclass
class LoadedModel:
    """One model of the comparison, once loaded: its decoder and what it costs."""

    label: str
    decoder: object | None = None
    weight_bytes: int = 0
    bytes_per_token: int = 0  # what one decode step streams (the embedding is only gathered)
    rss_bytes: int = 0  # resident memory added by loading it, less its compiled step's
    compile_bytes: int = 0  # resident memory its compiled step added (the compiler's graphs, code and guards)
    error: str | None = None


class OneAtATime:
    """The tokenizer for the handlers of many replies at once: a fast tokenizer is not thread-safe (a call that
    sets split_special_tokens while another encodes raised "RuntimeError: Already borrowed" with 8 visitors), so
    its calls take turns. Each is short next to a reply."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.turn = tokenizer, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.turn:
            return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self.tokenizer, name)
        if not callable(attr):
            return attr

        def in_turn(*args, **kwargs):
            with self.turn:
                return attr(*args, **kwargs)

        return in_turn


class CpuUse:
    """Replies share the models (the scheduler batches them); switching the pair and the benchmark need them
    alone: they wait for the replies in progress, and replies asked for meanwhile wait for them.

    A reply whose generator is never resumed again (a client that vanished without Gradio closing it) would hold
    its share for good, and the benchmark, a switch and every reply after them would wait forever. So a share
    says when its reply last moved (`moved`), and `alone` drops the shares that all stood still for STALE_S while
    the engine had no work (`working`); a dropped reply that moves after all waits for `alone` to end."""

    STALE_S = 60.0

    def __init__(self, working: Callable[[], bool] = lambda: False) -> None:
        self.changed = threading.Condition()
        self.moved_at: dict[int, float] = {}  # per share, when its reply last moved
        self.alone_now, self.working, self.next_share = False, working, 0

    @property
    def replies(self) -> int:
        return len(self.moved_at)

    @contextmanager
    def shared(self) -> Iterator[Callable[[], None]]:
        with self.changed:
            self.changed.wait_for(lambda: not self.alone_now)
            share, self.next_share = self.next_share, self.next_share + 1
            self.moved_at[share] = time.monotonic()

        def moved() -> None:
            with self.changed:
                if share not in self.moved_at:  # dropped as stale: the models may be another's alone now
                    self.changed.wait_for(lambda: not self.alone_now)
                self.moved_at[share] = time.monotonic()

        try:
            yield moved
        finally:
            with self.changed:
                self.moved_at.pop(share, None)
                self.changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: not self.alone_now)
            self.alone_now = True
            while not self.changed.wait_for(self.idle, timeout=1.0):
                pass
        try:
            yield
        finally:
            with self.changed:
                self.alone_now = False
                self.changed.notify_all()

    def idle(self) -> bool:
        """No reply holds a share, once those that stood still with the engine idle are dropped."""
        now = time.monotonic()
        if (
            self.moved_at
            and not self.working()
            and all(now - t > self.STALE_S for t in self.moved_at.values())
        ):
            log.warning(
                "%d replies stood still for %.0f s: their shares are dropped", self.replies, self.STALE_S
            )
            self.moved_at.clear()
        return not self.moved_at

    def busy(self) -> bool:
        return self.replies > 0 or self.alone_now


@dataclass
class Serving:
    """The app's state: which pair serves, how far loading has come, and who may use the models now (`cpu`)."""

    pairs: list[Pair]
    pair: Pair | None = None
    status: str = "Starting…"
    ready: bool = False  # a model answers (BF16 alone while the INT8 copy is built)
    tokenizer: object = None
    window: int = 0  # the model's context window, in tokens
    int8: LoadedModel = field(default_factory=lambda: LoadedModel("INT8"))
    bf16: LoadedModel = field(default_factory=lambda: LoadedModel("BF16"))
    report: dict | None = None  # quantize_report.json of the INT8 folder, when it has one
    building: tqdm | None = None  # the first-start INT8 build's stage bar, while it runs
    # the maintainer command (`python -m quantize`'s main(argv, stage_bar)), handed in by the app: the runtime never
    # imports the build; None: INT8 models come from Q8CHAT_INT8_MODEL only
    build: Callable[..., int] | None = None
    cpu: CpuUse = field(default_factory=lambda: CpuUse(working=lambda: chat.SCHEDULER.running))

    @property
    def compare_available(self) -> bool:
        return self.int8.decoder is not None and self.bf16.decoder is not None

    def chat_model(self) -> LoadedModel:
        """INT8 when it is loaded; BF16 otherwise (while INT8 builds, or when it failed)."""
        return self.int8 if self.int8.decoder is not None else self.bf16


# ---------------------------------------------------------------- configuration


def configured_pairs() -> list[Pair]:
    """The first pair from Q8CHAT_BF16_MODEL / Q8CHAT_INT8_MODEL (default: the embedded model), then the pairs of
    the Q8CHAT_MODELS file that can be reached from here."""
    env = os.environ.get
    bf16 = env("Q8CHAT_BF16_MODEL") or None
    first = Pair(
        bf16 or "SmolLM2-135M-Instruct",
        bf16,
        env("Q8CHAT_INT8_MODEL") or None,
        env("Q8CHAT_INT8_REVISION"),
        env("Q8CHAT_INT8_ENDPOINT") or None,
        env("Q8CHAT_BF16_ENDPOINT") or None,
    )
    pairs = [first]
    if env("Q8CHAT_MODELS"):
        try:
            pairs += [Pair(**entry) for entry in json.loads(Path(env("Q8CHAT_MODELS")).read_text())]
        except (OSError, ValueError, TypeError) as e:
            log.error("Q8CHAT_MODELS is not a readable list of {name, bf16, int8, revision}: %s", e)
    return [p for p in pairs if reachable(p)]


def reachable(pair: Pair) -> bool:
    """Local folders must exist; Hub ids need the Hub to answer (offline, such a pair is not offered)."""
    sources = [s for s in (pair.bf16, pair.int8) if s]
    on_hub = [s for s in sources if not Path(s).expanduser().exists()]
    if on_hub and not models.hub_reachable():
        log.warning(
            "model pair %r not offered: %s needs the Hub, which does not answer", pair.name, on_hub[0]
        )
        return False
    return True


# ---------------------------------------------------------------- loading


def load_resident(side: LoadedModel, load) -> None:
    """Load a model and record the resident memory it adds, after one forward pass so that memory-mapped
    weights are actually paged in; what its compiled step added apart (a cold compile left INT8's bigger graphs
    more of Python's heap than BF16's: 730 MB against 603 in all, where the models hold 164 and 269 MB of
    weights)."""
    before = settled_rss()
    decoder = load()
    with torch.inference_mode():
        decoder.forward(torch.tensor([1, 2, 3]), decoder.new_cache(8))
    side.compile_bytes = getattr(decoder, "compile_bytes", 0)
    side.rss_bytes = max(settled_rss() - before - side.compile_bytes, 0)
    side.weight_bytes = decoder.weight_bytes
    side.bytes_per_token = decoder.bytes_per_token
    side.decoder = decoder


def start_loading(state: Serving, pair: Pair) -> None:
    """Load `pair` in a background thread (see load_pair); `loading` tells while it runs."""
    threading.Thread(target=load_pair, args=(state, pair), daemon=True, name="load-pair").start()


def loading() -> bool:
    """A pair is being loaded (or its INT8 copy built) in the background."""
    return any(t.name == "load-pair" for t in threading.enumerate())


def switch(state: Serving, name: str) -> None:
    """Unload the current pair (after the replies in progress) and load the pair called `name`."""
    pair = next(p for p in state.pairs if p.name == name)
    with state.cpu.alone():
        unload(state)
        state.status = f"Switching to {name}…"
    start_loading(state, pair)


def threads() -> int:
    """The torch threads the models run with."""
    return int(os.environ.get("Q8CHAT_THREADS", os.cpu_count() or 1))


def status(state: Serving) -> dict:
    """Whether a model answers, which, and what is loading; for clients and health checks."""
    return {
        "ready": state.ready,
        "status": state.status,
        "int8_error": state.int8.error,
        "bf16_error": state.bf16.error,
        "compare": state.compare_available,
        "busy": state.cpu.busy(),
        "chat_model": state.chat_model().label if state.ready else None,
        "pair": state.pair.name if state.pair else None,
        "loading": loading(),
        # read, not settled: a collection here would stall the model thread for every tab polling each second
        # (the app settles memory after each reply instead)
        "rss_bytes": machine.rss_bytes(),
        "threads": threads(),
    }


# What the OS must keep beside the caches: a prompt's activations, the page's buffers
CACHE_HEADROOM_BYTES = 256 << 20


def cache_room(state: Serving) -> tuple[int, int | None]:
    """The scheduler's room for caches (scheduler.Scheduler): what the OS and the container leave now, less a
    headroom; and with Q8CHAT_MEMORY_BYTES, what it leaves beside the loaded weights and the visitors' kept caches."""
    budget = os.environ.get("Q8CHAT_MEMORY_BYTES")
    held = state.int8.weight_bytes + state.bf16.weight_bytes + chat.PREFIXES.nbytes
    return machine.os_room() - CACHE_HEADROOM_BYTES, int(budget) - held if budget else None


def load_pair(state: Serving, pair: Pair) -> None:
    """Load BF16 (the chat answers from then on), then the INT8 copy, building it first if needed. Runs in a
    background thread; every failure ends up in the state for the page, never kills the app."""
    torch.set_num_threads(threads())
    state.pair, state.int8, state.bf16, state.report = pair, LoadedModel("INT8"), LoadedModel("BF16"), None
    chat.SCHEDULER.room = functools.partial(cache_room, state)
    if pair.int8_endpoint or pair.bf16_endpoint:
        return serve_remote(state, pair)
    try:
        compiling = " and compiling its decode step" if kernels.compiled_step() else ""
        state.status = f"Loading the BF16 model of {pair.name}{compiling}…"
        src = models.resolve_model(pair.bf16)
        models.refuse_downloaded_pickles(src)
        state.tokenizer = OneAtATime(models.load_tokenizer(src))
        state.window = int(
            json.loads((Path(src) / "config.json").read_text()).get("max_position_embeddings", 0)
        )
        state.bf16.label = f"BF16 · {pair.bf16 or models.DEFAULT_MODEL_LABEL}"
        state.bf16.error = why_bf16_does_not_fit(src, pair)
        if state.bf16.error is None:
            load_resident(state.bf16, lambda: decoders.open_bf16(src))
            state.ready = True
    except Exception as e:  # noqa: BLE001 - any failure here must reach the page, not kill the app
        state.bf16.error = for_visitors(e)
        log.exception("BF16 model failed to load")
    try:
        serve_int8(state, pair)
    except Exception as e:  # noqa: BLE001
        state.int8.error = for_visitors(e)
        log.exception("INT8 model failed to load")
    state.ready = state.chat_model().decoder is not None
    state.status = "" if state.ready else "No model could be loaded: " + (state.bf16.error or "")


def serve_remote(state: Serving, pair: Pair) -> None:
    """A pair served elsewhere (runtime/remote.py): no weights here, only the tokenizer of its BF16 model (the
    prompt's limits, Continue's ids). A server that does not answer now leaves the app up: the status says so,
    and each reply asks it again."""
    try:
        src = models.resolve_model(pair.bf16)
        state.tokenizer = OneAtATime(models.load_tokenizer(src))
        config = json.loads((Path(src) / "config.json").read_text())
        state.window = int(config.get("max_position_embeddings", 0))
    except Exception as e:  # noqa: BLE001 - any failure here must reach the page, not kill the app
        state.status = "No model could be loaded: " + for_visitors(e)
        log.exception("the tokenizer of the served pair failed to load")
        return
    waiting = []
    for side, url in ((state.int8, pair.int8_endpoint), (state.bf16, pair.bf16_endpoint)):
        if not url:
            side.error = (
                f"No {side.label} server is set (Q8CHAT_{side.label}_ENDPOINT): the comparison is off."
            )
            continue
        try:
            endpoint = remote.Endpoint(url, side.label)
        except remote.EndpointError as e:
            side.error = str(e)
            continue
        try:
            side.label += f" · {DIRECTORIES.sub('', endpoint.connect())}"
        except remote.EndpointError as e:  # not yet: each reply asks again
            waiting.append(str(e))
        side.decoder = endpoint
    state.ready = state.chat_model().decoder is not None
    errors = [m.error for m in (state.int8, state.bf16) if m.error and m.decoder is None]
    state.status = " ".join(waiting) if state.ready else "No model could be loaded: " + " ".join(errors)


# A folder path in a message: every directory before its last part (the page says `default`, not /root/.cache/…)
DIRECTORIES = re.compile(r"(?<![\w:/.])~?/(?:[^\s/'\"`]+/)+")


def for_visitors(error: Exception) -> str:
    """What the page and /status say of a failure: a ModelError's sentence without the directories of the paths in
    it; anything else, only its kind (the server log has the whole of it)."""
    if isinstance(error, ModelError):
        return DIRECTORIES.sub("", str(error))
    return f"loading failed ({type(error).__name__}); the server log has the details."


def why_bf16_does_not_fit(src: Path, pair: Pair) -> str | None:
    """None when BF16 and its INT8 copy fit in memory together; else what the panel says instead of comparing.
    A 7B pair needs about 22 GB: loading both on a 16 GB Space would get the app killed."""
    bf16 = decoders.weight_file_bytes(src)
    local = Path(pair.int8).expanduser() if pair.int8 else models.default_int8_dir(pair.bf16)
    # an INT8 folder not here yet (to build, or on the Hub): about half of BF16's bytes
    int8 = decoders.weight_file_bytes(local) if models.is_int8_folder(local) else bf16 // 2
    return why_pair_does_not_fit(bf16, int8)


def serve_int8(state: Serving, pair: Pair) -> None:
    """The pair's INT8 model: its configured folder or Hub id, else the cached copy, built first if missing."""
    if pair.int8:
        state.status = f"Loading the INT8 model {pair.int8}…"
        int8_dir = models.resolve_int8(pair.int8, revision=pair.revision)
    else:
        int8_dir = models.default_int8_dir(pair.bf16)
        if not models.is_int8_folder(int8_dir):
            state.status = "First start: building the INT8 model with SmoothQuant; BF16 answers meanwhile."
            build_int8(state, pair.bf16, int8_dir)
    # the second copy of INT8's large Linears for batches (engine.load) only where memory has room for both copies
    # now, BF16 already in it: the comparison comes first
    batched = BATCHED and why_pair_does_not_fit(0, 2 * decoders.weight_file_bytes(int8_dir)) is None
    compiling = kernels.compiled_step() or (
        kernels.rows_kind(batched, not kernels.full_range_activations()) == "compiled"
    )
    state.status = "Loading the INT8 model" + (
        " and compiling its kernels (kept on disk: the next start reads them back)…" if compiling else "…"
    )
    int8 = LoadedModel(
        f"INT8 · {pair.int8 or int8_dir.name}"
        + (f" @ {pair.revision[:10]}" if pair.int8 and pair.revision else "")
    )
    load_resident(int8, lambda: decoders.open_int8(int8_dir, batched=batched))
    report = Path(int8_dir) / "quantize_report.json"
    state.report = json.loads(report.read_text()) if report.is_file() else None
    if state.tokenizer is None:
        state.tokenizer = OneAtATime(models.load_tokenizer(int8_dir))
    state.int8 = int8  # one assignment: the next reply runs on INT8


def build_int8(state: Serving, bf16_arg: str | None, out: Path) -> None:
    """`python -m quantize` in this process, its stage bar kept in the state so the page can show it."""
    if state.build is None:
        raise ModelError("This app cannot build INT8 models: set Q8CHAT_INT8_MODEL to an INT8 folder.")

    def stage_bar(**kwargs) -> tqdm:
        state.building = tqdm(**kwargs)
        return state.building

    # the shipped recipe alone, no tuning search while a visitor waits; its card says whether it meets the bar
    # nor vLLM's row on the card (--vllm-python ""): that measure is the maintainer's
    argv = ["--out", str(out), "--skip-baseline", "--overwrite", "--tune-trials", "1", "--vllm-python", ""]
    argv += ["--model", bf16_arg] if bf16_arg else []
    try:
        if state.build(argv, stage_bar=stage_bar) != 0:
            raise ModelError("Building the INT8 model failed; see the server log.")
    finally:
        state.building = None


def unload(state: Serving) -> None:
    """Drop both models and give their memory back before another pair loads."""
    state.ready = False
    chat.PREFIXES.clear()  # K and V of the models that go
    state.int8, state.bf16, state.tokenizer, state.report = (
        LoadedModel("INT8"),
        LoadedModel("BF16"),
        None,
        None,
    )
    settled_rss()
