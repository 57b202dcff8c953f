"""The chat's machinery outside the browser: sampling, the live decode worker (stop, errors, join), one visitor's
Stop and Clear leaving another's reply alone, and the app's own refusals (the ones Gradio's validators never see)."""

import threading

import pytest
import torch

from quantize.runtime import chat, generate, sessions

VOCAB = 8
LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])


class FixedLogits:
    """A decoder that always predicts the same distribution; counts its forward passes and the threads they ran
    on; can fail at a step."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at, self.threads = 0, fail_at, set()

    def new_cache(self, max_len: int):
        return None

    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("the model broke at this step")
        return LOGITS[None, :]


class Tokenizer:
    eos_token_id = VOCAB + 1  # never produced: every reply runs to max_new_tokens

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def draws(sampling: generate.Sampling, n: int = 400) -> list[int]:
    return [s.token_id for s in generate.stream(FixedLogits(), torch.tensor([1]), sampling)][:n]


def nucleus(temperature: float, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p, computed here from softmax."""
    p = torch.softmax(LOGITS / temperature, -1).tolist()
    order = sorted(range(VOCAB), key=lambda i: -p[i])
    kept, total = set(), 0.0
    for i in order:
        if total >= top_p:
            break
        kept.add(i)
        total += p[i]
    return kept


def test_greedy_is_the_argmax_every_time():
    assert set(draws(generate.Sampling(max_new_tokens=50, temperature=0.0))) == {0}


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (1.0, 0.9), (1.5, 0.95), (1.0, 1.0)])
def test_sampling_draws_from_the_nucleus_only(temperature, top_p):
    got = draws(generate.Sampling(max_new_tokens=400, temperature=temperature, top_p=top_p, seed=3))
    expected = nucleus(temperature, top_p) if top_p < 1 else set(range(VOCAB))
    assert set(got) <= expected
    probs = torch.softmax(LOGITS / temperature, -1)
    likely = {i for i in expected if probs[i] > 0.02}  # with 400 draws, each of these shows up
    assert set(got) >= likely, (sorted(set(got)), sorted(likely))


def test_higher_temperature_flattens_the_draws():
    cold = draws(generate.Sampling(max_new_tokens=400, temperature=0.5, seed=1))
    hot = draws(generate.Sampling(max_new_tokens=400, temperature=1.5, seed=1))
    assert cold.count(0) > hot.count(0)


def test_a_seed_repeats_a_sample_and_another_seed_does_not():
    s = generate.Sampling(max_new_tokens=60, temperature=1.0, top_p=1.0, seed=7)
    assert draws(s) == draws(s)
    assert draws(s) != draws(generate.Sampling(max_new_tokens=60, temperature=1.0, top_p=1.0, seed=8))


def calls_once_the_model_thread_is_free(decoder: FixedLogits) -> int:
    """The decoder's forward passes counted on the model thread, after whatever was queued before: a worker
    still decoding would run to its max_new_tokens first."""
    return chat.on_model_thread(lambda: decoder.calls).result()


def test_decode_live_runs_to_the_end_on_the_model_thread():
    decoder = FixedLogits()
    replies = list(
        chat.decode_live(decoder, Tokenizer(), [1, 2], generate.Sampling(max_new_tokens=5), threading.Event())
    )
    last = replies[-1]
    assert last.token_ids == [0] * 5 and len(last.timing.stamps) == 5 and last.prompt_tokens == 2
    assert last.text == "0 0 0 0 0" and calls_once_the_model_thread_is_free(decoder) == 5
    model_thread = chat.on_model_thread(threading.get_ident).result()
    assert decoder.threads == {model_thread} != {threading.get_ident()}


def test_stop_ends_the_worker_at_the_next_token():
    stop, decoder = threading.Event(), FixedLogits()
    live = chat.decode_live(decoder, Tokenizer(), [1], generate.Sampling(max_new_tokens=100_000), stop)
    first = next(live)
    stop.set()
    final = ([first] + list(live))[-1]
    calls = decoder.calls
    assert calls_once_the_model_thread_is_free(decoder) == calls  # ended: no forward pass followed
    assert len(final.token_ids) < 100_000 and calls < 100_000
    assert len(final.token_ids) == len(final.timing.stamps)


def test_an_error_in_the_model_reaches_the_consumer_and_the_worker_is_gone():
    decoder = FixedLogits(fail_at=3)
    live = chat.decode_live(
        decoder, Tokenizer(), [1], generate.Sampling(max_new_tokens=50), threading.Event()
    )
    with pytest.raises(RuntimeError, match="the model broke"):
        list(live)
    assert calls_once_the_model_thread_is_free(decoder) == 3


def test_closing_the_stream_stops_the_model():
    """What a disconnect does: Gradio closes the generator; the worker must stop, not run to max_new_tokens."""
    decoder = FixedLogits()
    live = chat.decode_live(
        decoder, Tokenizer(), [1], generate.Sampling(max_new_tokens=100_000), threading.Event()
    )
    next(live)
    live.close()
    calls = decoder.calls
    # closing does not wait: a pass the scheduler had already picked the reply for may still run, none after it
    assert calls_once_the_model_thread_is_free(decoder) <= calls + 1 < 100_000


class HeldForward(FixedLogits):
    """A decoder whose second forward pass waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.release = threading.Event(), threading.Event()

    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        if self.calls == 1:
            self.inside.set()
            assert self.release.wait(timeout=60)
        return super().forward(ids, cache)


def test_a_visitor_leaving_mid_pass_never_waits_for_the_pass():
    """Gradio may close the stream on its event loop: closing returns while the model is still inside a forward
    pass (which then ends on its own thread, and the model stops), instead of holding the server for that pass."""
    decoder = HeldForward()
    live = chat.decode_live(
        decoder, Tokenizer(), [1], generate.Sampling(max_new_tokens=100_000), threading.Event()
    )
    next(live)
    assert decoder.inside.wait(timeout=60)
    closing = threading.Thread(target=live.close)
    closing.start()
    closing.join(timeout=30)
    returned = not closing.is_alive()
    decoder.release.set()  # let the held pass end either way, so a failure leaves no thread behind
    assert returned, "closing the stream waited for the model's forward pass"
    assert calls_once_the_model_thread_is_free(decoder) == 2  # and the worker stopped after that pass


def test_stop_reaches_a_reply_still_waiting_for_the_model():
    """Stop pressed while the reply waits (the model thread is busy): it ends without a forward pass once the model
    is free, instead of running to its max_new_tokens."""
    stop, decoder, hold = threading.Event(), FixedLogits(), threading.Event()
    chat.on_model_thread(hold.wait)
    live = chat.decode_live(decoder, Tokenizer(), [1], generate.Sampling(max_new_tokens=100_000), stop)
    replies = []
    reader = threading.Thread(target=lambda: replies.extend(live))
    reader.start()
    stop.set()
    reader.join(timeout=2 * chat.UI_INTERVAL_S + 1)  # it waits on the model; Stop is seen meanwhile
    hold.set()
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert calls_once_the_model_thread_is_free(decoder) == 0 and replies[-1].token_ids == []


def test_one_visitors_stop_and_clear_leave_anothers_reply_alone():
    s = sessions.Sessions()
    with s.generation("alice") as alice, s.generation("bob") as bob:
        s.stop("bob")
        assert bob.stop.is_set() and not alice.stop.is_set()
        s.clear("bob")
        assert bob.abandoned and not alice.abandoned and not alice.stop.is_set()
    assert s.cleared_since("bob", 0) and not s.cleared_since("alice", 0)
    assert not s.cleared_since("bob", s.clear("bob"))  # a request sent after the latest Clear runs


def test_stop_from_a_visitor_with_nothing_running_touches_nobody():
    s = sessions.Sessions()
    with s.generation("alice") as alice:
        s.stop("carol")
        s.clear("carol")
    assert not alice.stop.is_set() and not alice.abandoned


def test_sessions_forget_the_oldest_clear_counts_beyond_their_bound():
    s = sessions.Sessions(remembered=3)
    for name in "abcd":
        s.clear(name)
    assert set(s.clear_counts) == {"b", "c", "d"}


@pytest.fixture
def page():
    """The app's page built in this process (not launched), its models not loaded."""
    import app

    app.build_ui()
    return app


def test_the_app_refuses_while_no_model_answers_and_keeps_the_text(page, monkeypatch):
    monkeypatch.setattr(page.STATE, "ready", False)
    monkeypatch.setattr(page.STATE, "status", "Loading the BF16 model of X…")
    out = next(page.respond("hello", [], "", 64, 0.0, 0.9, True, 0, None))
    assert out[page.UI.notice] == "Not sent: Loading the BF16 model of X…"
    assert out[page.UI.message] == "hello" and out[page.UI.chatbot] == []


@pytest.mark.parametrize(
    "settings,says",
    [
        (("lots", 0.0, 0.9), "max_new_tokens must be a number"),
        ((64, float("nan"), 0.9), "temperature must be a number"),
    ],
)
def test_the_app_refuses_settings_gradio_never_checked(page, monkeypatch, settings, says):
    """An API client bypassing the sliders' validation still gets a sentence, and its text and chat back."""
    monkeypatch.setattr(page.STATE, "ready", True)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = next(page.respond("again", history, "", *settings, True, 0, None))
    assert out[page.UI.notice].startswith("Not sent: ") and says in out[page.UI.notice]
    assert out[page.UI.message] == "again" and out[page.UI.chatbot] == history


def test_continue_with_nothing_to_continue_is_refused(page, monkeypatch):
    monkeypatch.setattr(page.STATE, "ready", True)
    out = next(page.continue_reply([], None, 64, 0.0, 0.9, True, 0, None))
    assert out[page.UI.notice] == "Not sent: Nothing to continue: send a message first."
