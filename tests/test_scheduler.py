"""The scheduler (quantize/runtime/scheduler.py) on the default model's BF16 engine: replies decoded together get
their own model's greedy tokens, the slots and the line are kept, a Stop or a failure touches only its own reply,
and a visitor's next turn reads only its new tokens (prefix reuse, quantize/runtime/prefixes.py).

A reply read in chunks between others' steps, or decoded in a batch, sums its floats in another order than alone,
and this model has near-ties that such last-bit noise flips on some CPUs (an AMD EPYC's BF16 kernels diverged from
alone at the 5th token of the long prompt). So where the batching differs from alone's, a test does not ask for
alone's tokens: it asks that every token be its model's greedy choice after the reply's own tokens before it
(follows_greedy). A reply routed to another's cache, fed another's token or read twice fails that by nats.
Where the path is alone's own (one reply in the scheduler), the tokens are alone's exactly."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from quantize.runtime import engine
from quantize.runtime.generate import Sampling, stream
from quantize.runtime.prefixes import Keeping, Prefixes
from quantize.runtime.scheduler import Scheduler, Sequence

TOKENS = 12
PROMPTS = [  # of different lengths; the last is longer than a prefill chunk, so it is read over several turns
    "What is the capital of Japan?",
    "Write one sentence about the sea.",
    "List three colours of the rainbow, one per line. " * 12,
]


class OneByOne:
    """The engine without `step`, as the generic path is, with a record of the rows each forward pass read."""

    def __init__(self, model) -> None:
        self.model, self.rows, self.max_len = model, [], model.max_len

    def new_cache(self, max_len):
        return self.model.new_cache(max_len)

    @property
    def position_bytes(self) -> int:
        return self.model.position_bytes

    def forward(self, ids, cache):
        self.rows.append(("prompt" if len(ids) > 1 else "token", len(ids)))
        return self.model.forward(ids, cache)


class Spy(OneByOne):
    """The engine, batched steps (over its pool of cache slots) included, with the same record."""

    def new_pool(self, slots):
        return self.model.new_pool(slots)

    def step(self, ids, caches):
        self.rows.append(("step", len(ids)))
        return self.model.step(ids, caches)


@pytest.fixture(scope="module")
def model(default_dir):
    return engine.load(default_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in PROMPTS
    ]
    assert len(ids[-1]) > 64
    return ids


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt's greedy tokens, decoded by itself."""
    return [
        [s.token_id for s in stream(model, torch.tensor(p), Sampling(max_new_tokens=TOKENS))] for p in prompts
    ]


# The engine's stated tolerance for the same logits summed in another order (tests/test_engine.py: batched steps
# against one by one): 2% of the logits' largest magnitude. A token whose logit is within it of the top is greedy.
TIE = 0.02


def follows_greedy(model, prompt: list[int], tokens: list[int]) -> bool:
    """Whether each of `tokens` is the model's greedy choice after the prompt and the tokens before it, within TIE:
    the whole reply read teacher-forced in one pass."""
    ids = torch.tensor(prompt + tokens[:-1])
    with torch.inference_mode():
        logits = model.forward(ids, model.new_cache(len(ids)), all_logits=True)[len(prompt) - 1 :]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    lead = logits.max(1).values - chosen
    return bool((lead <= TIE * logits.abs().max(1).values).all())


def all_greedy(model, prompts: list[list[int]], got: list[list[int]], budgets: list[int]) -> bool:
    return all(len(g) == n and follows_greedy(model, p, g) for p, g, n in zip(prompts, got, budgets))


def read_all(seqs: list[Sequence], leave_after: dict[int, int] | None = None) -> list[list[int]]:
    """Every sequence's tokens, each read on its own thread as the app's handlers do; the reader of sequence i
    leaves after leave_after[i] tokens (closing its steps, as a visitor who leaves)."""
    got = [[] for _ in seqs]

    def read(i: int) -> None:
        for step in seqs[i].steps():
            got[i].append(step.token_id)
            if len(got[i]) == (leave_after or {}).get(i):
                break

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return got


@pytest.fixture
def model_thread():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def test_replies_decoded_together_get_their_own_greedy_tokens(model, prompts, model_thread):
    spy = Spy(model)
    scheduler = Scheduler(slots=4, run_on=model_thread)
    first = scheduler.submit(Sequence(spy, prompts[0], Sampling(max_new_tokens=TOKENS)))
    steps = first.steps()
    early = [next(steps).token_id for _ in range(3)]  # the others join a reply already decoding
    rest = [scheduler.submit(Sequence(spy, p, Sampling(max_new_tokens=TOKENS))) for p in prompts[1:]]
    stamped = [s for s in steps]
    got = read_all(rest)
    assert all_greedy(model, prompts, [early + [s.token_id for s in stamped], *got], [TOKENS] * 3)
    # each token says how long its model's pass took: never more than the wait since the token before it
    assert all(0 < b.took <= b.t - a.t for a, b in zip(stamped, stamped[1:]))
    # the steps were shared (three sequences in one forward pass), and the long prompt was read in chunks of 64
    # with the others' steps in between, so it never held them up for more than a chunk
    assert ("step", 3) in spy.rows
    chunks = [i for i, row in enumerate(spy.rows) if row == ("prompt", 64)]
    assert len(chunks) >= 2 and all(spy.rows[i + 1][0] == "step" for i in chunks)


def test_a_reply_that_stops_leaves_the_others_greedy(model, prompts, model_thread):
    scheduler = Scheduler(slots=2, run_on=model_thread)
    spy = Spy(model)
    budgets = [64, TOKENS, TOKENS]  # the first could go on for 64 tokens; its visitor leaves after 4
    seqs = [scheduler.submit(Sequence(spy, p, Sampling(max_new_tokens=n))) for p, n in zip(prompts, budgets)]
    got = read_all(seqs, leave_after={0: 4})
    assert all_greedy(model, prompts, got, [4, TOKENS, TOKENS])
    model_thread.submit(lambda: None).result()  # the scheduler's loop has ended: nothing more is decoded
    # the third waited for a slot and took the first's when it left: never more than two in a step
    assert max(n for kind, n in spy.rows if kind == "step") == 2
    # the first stopped soon after its visitor left: far fewer tokens decoded than its 64
    assert sum(n for kind, n in spy.rows if kind == "step") <= 2 * (TOKENS - 1) + 32


def test_slots_bound_the_batch_and_the_line_keeps_arrival_order(model, prompts, model_thread):
    hold = threading.Event()
    model_thread.submit(hold.wait)  # the model thread is busy: every sequence is in line when it starts
    scheduler = Scheduler(slots=1, run_on=model_thread)
    spy = Spy(model)
    seqs = [scheduler.submit(Sequence(spy, p, Sampling(max_new_tokens=4))) for p in prompts]
    assert [s.place for s in seqs] == [0, 1, 2]  # what a visitor is told: the first has the slot, two wait
    hold.set()
    assert [len(g) for g in read_all(seqs)] == [4, 4, 4]
    # one reply at a time, in arrival order: a prompt is read in one pass (nobody else waits on it), its first
    # token comes from that pass, three passes of one token make the rest (alone: the path generate.stream
    # runs), and only then is the next prompt read
    expected = []
    for p in prompts:
        expected += [("prompt", len(p))] + [("token", 1)] * 3
    assert spy.rows == expected


def test_a_failing_reply_ends_alone_and_the_model_goes_on(model, prompts, model_thread):
    class Failing(Spy):
        def forward(self, ids, cache):
            raise RuntimeError("this model is broken")

    scheduler = Scheduler(slots=4, run_on=model_thread)
    broken = scheduler.submit(Sequence(Failing(model), prompts[2], Sampling(max_new_tokens=TOKENS)))
    fine = scheduler.submit(Sequence(Spy(model), prompts[0], Sampling(max_new_tokens=TOKENS)))
    with pytest.raises(RuntimeError, match="broken"):
        list(broken.steps())
    fine_said = [s.token_id for s in fine.steps()]
    later = scheduler.submit(Sequence(Spy(model), prompts[1], Sampling(max_new_tokens=TOKENS)))
    later_said = [s.token_id for s in later.steps()]
    assert all_greedy(model, prompts[:2], [fine_said, later_said], [TOKENS] * 2)


def test_a_decoder_without_batched_steps_runs_its_replies_one_by_one(model, prompts, model_thread):
    scheduler = Scheduler(slots=4, run_on=model_thread)
    generic = OneByOne(model)
    seqs = [scheduler.submit(Sequence(generic, p, Sampling(max_new_tokens=TOKENS))) for p in prompts]
    assert all_greedy(model, prompts, read_all(seqs), [TOKENS] * 3)
    assert ("token", 1) in generic.rows and not any(kind == "step" for kind, _ in generic.rows)


@pytest.mark.parametrize("batched", [True, False], ids=["batched step", "generic path"])
def test_a_reply_that_fails_among_others_ends_alone(model, prompts, model_thread, batched):
    """One reply's pass fails after three of its tokens (as a full cache would), in a turn where another reply
    decodes too: with the engine's batched step (which advances no cache unless whole) the batch is run again one
    reply at a time; on the generic path (no step) the replies run one after another, the failing one after the
    other has taken its token. Either way the failing reply ends with its error and the other goes on, its cache
    fed each token once: its prompt and its own tokens, in order. (Before, on the generic path, the turn was rerun
    and the first reply's cache read its token twice; this model's greedy tokens happen not to show it.)"""
    doomed_caches: set[int] = set()  # the doomed reply's cache, told apart by the prompt it read
    fed: dict[int, list[int]] = {}  # per cache, the tokens the model read into it

    def full(cache) -> bool:
        return id(cache) in doomed_caches and cache.length >= len(prompts[1]) + 3

    def forward(self, ids, cache):
        if ids.tolist() == prompts[1]:
            doomed_caches.add(id(cache))
        if full(cache):
            raise ValueError("this conversation's cache is full")
        fed.setdefault(id(cache), []).extend(ids.tolist())
        return Spy.forward(self, ids, cache)

    def step(self, ids, caches):
        if any(full(c) for c in caches):
            raise ValueError("this conversation's cache is full")
        for token, c in zip(ids.tolist(), caches):
            fed.setdefault(id(c), []).append(token)
        return Spy.step(self, ids, caches)

    kind = type(
        "BreaksOneCache",
        (Spy,) if batched else (OneByOne,),
        {"forward": forward} | ({"step": step} if batched else {}),
    )
    decoder = kind(model)
    scheduler = Scheduler(slots=4, run_on=model_thread)
    fine = scheduler.submit(Sequence(decoder, prompts[0], Sampling(max_new_tokens=TOKENS)))
    doomed = scheduler.submit(Sequence(decoder, prompts[1], Sampling(max_new_tokens=TOKENS + 1)))
    got = read_all([fine])
    with pytest.raises(ValueError, match="cache is full"):
        list(doomed.steps())
    assert [f for f in fed.values() if f[: len(prompts[0])] == prompts[0]] == [prompts[0] + got[0][:-1]]
    assert all_greedy(model, prompts[:1], got, [TOKENS])
    assert (("step", 2) in decoder.rows) == batched  # together in one batch before it failed


def test_an_empty_prompt_ends_at_once_with_a_sentence(model, model_thread):
    seq = Scheduler(slots=1, run_on=model_thread).submit(Sequence(model, [], Sampling(max_new_tokens=4)))
    with pytest.raises(ValueError, match="empty prompt"):
        list(seq.steps())


def shared_start(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def two_turns(tokenizer, said: list[int]) -> list[int]:
    """The second turn's prompt, as the app builds it: the first exchange as the chat template renders its text,
    then a new message."""
    chat = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": tokenizer.decode(said, skip_special_tokens=True)},
        {"role": "user", "content": PROMPTS[1]},
    ]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True)


def reply(scheduler, decoder, prompt, visitor, at_most=None) -> list[int]:
    sampling = Sampling(max_new_tokens=TOKENS)
    seq = scheduler.submit(Sequence(decoder, prompt, sampling, keeping=Keeping(visitor, at_most)))
    return [s.token_id for s in seq.steps()]


def test_a_visitors_next_turn_reads_only_what_is_new(model, tokenizer, prompts, alone, model_thread):
    """The first turn's cache (its prompt and its answer but the last token, which was never read) is kept; the
    second turn's prompt starts with most of it, so only the rest is read, and the answer is the one the whole
    prompt read afresh gives. Another visitor, or the same one after forgetting, reads it all."""
    spy = Spy(model)
    prefixes = Prefixes(budget=10**9)
    scheduler = Scheduler(slots=2, run_on=model_thread, prefixes=prefixes)
    said = reply(scheduler, spy, prompts[0], "visitor")
    assert said == alone[0]  # keeping changes nothing of the turn that keeps
    second = two_turns(tokenizer, said)
    kept = shared_start(prompts[0] + said[:-1], second)
    assert kept > len(prompts[0])  # the answer's tokens come back as they were said

    spy.rows.clear()
    again = reply(scheduler, spy, second, "visitor")
    assert spy.rows[0] == ("prompt", len(second) - kept)
    spy.rows.clear()
    afresh = reply(scheduler, spy, second, "another visitor")
    assert spy.rows[0] == ("prompt", len(second))
    # read from the kept cache or afresh (two different passes), the answer is the whole prompt's greedy one
    assert all_greedy(model, [second, second], [again, afresh], [TOKENS] * 2)

    prefixes.forget("visitor")  # Clear
    spy.rows.clear()
    reply(scheduler, spy, second, "visitor")
    assert spy.rows[0] == ("prompt", len(second))
    spy.rows.clear()  # what one model kept is not another's: the same visitor on a second decoder reads it all
    other = Spy(model)
    reply(scheduler, other, second, "another visitor")
    assert other.rows[0] == ("prompt", len(second))


def test_kept_caches_stay_within_their_budget_least_recently_used_first(model, prompts, model_thread):
    """A budget with room for one conversation: a second visitor's reply pushes the first's out, so the second's
    next turn reads only its prompt's last token and the first's reads its prompt again; a budget of 0 keeps
    nothing."""
    one = model.new_cache(len(prompts[2]) + TOKENS)
    room = 2 * one.k.numel() * one.k.element_size()  # a whole cache, as it holds it in memory
    whole = len(prompts[2])
    for budget, reads in ((room, [whole, whole, 1, whole]), (0, [whole] * 4)):
        spy = Spy(model)
        prefixes = Prefixes(budget=budget)
        scheduler = Scheduler(slots=2, run_on=model_thread, prefixes=prefixes)
        first_reads = []
        for visitor in ("a", "b", "b", "a"):
            spy.rows.clear()
            reply(scheduler, spy, prompts[2], visitor)
            first_reads.append(spy.rows[0][1])  # the tokens its first pass read
        assert first_reads == reads, budget


def test_a_kept_prefix_is_taken_only_as_far_as_allowed_and_clear_wins_over_a_running_reply(
    model, tokenizer, prompts, model_thread
):
    """The comparison's rule: a reply told to take at most N kept tokens reads the rest. And Clear pressed while
    a reply runs: that reply keeps nothing, so the next turn reads its whole prompt."""
    spy = Spy(model)
    prefixes = Prefixes(budget=10**9)
    scheduler = Scheduler(slots=2, run_on=model_thread, prefixes=prefixes)
    said = reply(scheduler, spy, prompts[0], "visitor")
    second = two_turns(tokenizer, said)
    spy.rows.clear()
    reply(scheduler, spy, second, "visitor", at_most=5)
    assert spy.rows[0] == ("prompt", len(second) - 5)

    hold = threading.Event()
    model_thread.submit(hold.wait)  # the reply waits for the model thread: Clear comes before it runs
    running = scheduler.submit(
        Sequence(
            spy,
            second,
            Sampling(max_new_tokens=TOKENS),
            keeping=Keeping("visitor", epoch=prefixes.epoch("visitor")),
        )
    )
    prefixes.forget("visitor")
    hold.set()
    list(running.steps())
    spy.rows.clear()
    reply(scheduler, spy, second, "visitor")
    assert spy.rows[0] == ("prompt", len(second))


def test_a_reply_whose_cache_does_not_fit_beside_the_others_waits_for_one_to_end(
    model, prompts, model_thread
):
    """Room for one reply's cache at a time: the second waits in line, though a slot is free, until the first
    ends, then runs; both are whole. With nothing in the slots to wait for, a cache that does not fit ends its
    reply with the sentence."""
    from quantize.runtime.scheduler import NoRoom

    one = (
        (len(prompts[0]) + TOKENS) * 2 * len(model.blocks) * model.kv_heads * model.head_dim * 2
    )  # BF16 K, V
    spy = Spy(model)
    scheduler = Scheduler(slots=4, run_on=model_thread, room=lambda: (1 << 40, int(one * 1.5)))
    seqs = [scheduler.submit(Sequence(spy, prompts[0], Sampling(max_new_tokens=TOKENS))) for _ in range(2)]
    got = read_all(seqs)
    assert got[0] == got[1] and len(got[0]) == TOKENS
    assert ("step", 2) not in spy.rows  # never decoded together: the second waited for the first's cache
    tight = Scheduler(slots=4, run_on=model_thread, room=lambda: (one // 2, None))
    with pytest.raises(NoRoom, match="MB of memory"):
        list(tight.submit(Sequence(model, prompts[0], Sampling(max_new_tokens=TOKENS))).steps())
