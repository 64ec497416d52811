"""Property tests of the block manager and scheduler, driven without a model: random arrivals,
aborts and finishes under memory pressure never leak or double-free a block, every request
finishes or is aborted, and with prefix caching a sequence only ever reads cache slots that hold
its own tokens at their positions."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Request, Sequence, SequenceStatus
from lmserve.sampling_params import SamplingParams


def _check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = Counter(b for s in live for b in s.block_table)
    assert all(bm.ref_counts[b] == n for b, n in refs.items()), "ref count differs from table references"
    free = list(bm.free_blocks)
    assert len(free) == len(set(free)), "a block is in the free pool twice"
    assert not set(free) & set(refs), "a referenced block is also free"
    assert len(free) + len(refs) == bm.num_blocks, "a block leaked"
    assert all(bm.ref_counts[b] == 0 for b in free)
    assert all(bm.block_hash[b] == h for h, b in bm.cached.items()), "prefix-cache map inconsistent"


def _make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    request = Request(str(seq_id), None, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))
    seq = Sequence(seq_id, request, 0, list(range(prompt_len)), prompt_len, generator=None)
    request.seqs.append(seq)
    return seq


requests_strategy = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 20), st.integers(0, 6), st.booleans()),
    min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(requests=requests_strategy, num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 8), prefix_caching=st.booleans(),
       vocab=st.integers(1, 3))
def test_random_workloads_never_leak_blocks(requests, num_blocks, block_size, budget, max_seqs,
                                            prefix_caching, vocab):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    sched = Scheduler(bm, max_seqs, budget)
    capacity = num_blocks * block_size
    pending = []
    for i, (prompt_len, max_tokens, arrive_step, abort) in enumerate(requests):
        prompt_len = min(prompt_len, capacity - 1)
        max_tokens = min(max_tokens, capacity - prompt_len)  # the engine refuses longer requests
        seq = _make_seq(i, prompt_len, max_tokens)
        seq.token_ids = [t % vocab for t in range(i % 2, i % 2 + prompt_len)]  # many shared prefixes
        pending.append((arrive_step, seq, abort))
    live: list[Sequence] = []
    slot_content: dict[int, tuple[int, int]] = {}  # what the "model" wrote: slot -> (token, position)
    done: set[int] = set()
    for step in range(2000):
        for arrive_step, seq, _ in pending:
            if arrive_step == step:
                sched.add(seq)
                live.append(seq)
        scheduled = sched.schedule()
        assert sum(r.num_tokens for r in scheduled) <= budget
        assert len(sched.running) <= max_seqs
        for r in scheduled:
            seq, c = r.seq, r.seq.num_computed_tokens
            assert bm.blocks_for(c + r.num_tokens) <= len(seq.block_table)
            for p in range(c):  # context read by attention must be this sequence's own tokens
                assert slot_content.get(bm.slot(seq, p)) == (seq.token_ids[p], p)
            for p in range(c, c + r.num_tokens):
                slot = bm.slot(seq, p)
                block = seq.block_table[p // block_size]
                assert bm.ref_counts[block] == 1 or slot_content.get(slot) == (seq.token_ids[p], p), \
                    "a write into a shared block would change another sequence's context"
                slot_content[slot] = (seq.token_ids[p], p)
        for r in scheduled:
            r.seq.num_computed_tokens += r.num_tokens
            bm.register_full_blocks(r.seq)
        for r in scheduled:
            seq = r.seq
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                abort = next(a for _, s, a in pending if s is seq)
                if seq.num_output_tokens >= seq.params.max_tokens or (abort and seq.num_output_tokens == 1):
                    seq.status = SequenceStatus.FINISHED
                    sched.remove(seq)
                    live.remove(seq)
                    done.add(seq.seq_id)
        _check_invariants(bm, live)
        if not sched.has_unfinished() and step > max(a for a, _, _ in pending):
            break
    assert done == {s.seq_id for _, s, _ in pending}, "some request never finished"
    assert bm.num_free_blocks == num_blocks


def test_new_request_joins_running_batch_next_step():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 64)
    a = _make_seq(0, 10, 5)
    sched.add(a)
    first = sched.schedule()
    assert [(r.seq, r.num_tokens) for r in first] == [(a, 10)]
    a.num_computed_tokens += 10
    a.token_ids.append(1)
    b = _make_seq(1, 6, 5)
    sched.add(b)
    second = sched.schedule()
    assert [(r.seq, r.num_tokens) for r in second] == [(a, 1), (b, 6)]


def test_long_prompt_is_chunked_under_the_token_budget():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 16)
    seq = _make_seq(0, 40, 1)
    sched.add(seq)
    chunks = []
    while seq.num_computed_tokens < seq.num_tokens:
        (r,) = sched.schedule()
        chunks.append(r.num_tokens)
        seq.num_computed_tokens += r.num_tokens
    assert chunks == [16, 16, 8]


def test_prefix_cache_reuses_full_blocks_and_reports_hits():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, 8, 64)
    first = _make_seq(0, 10, 1)
    sched.add(first)
    (r,) = sched.schedule()
    first.num_computed_tokens += r.num_tokens
    bm.register_full_blocks(first)
    first_table = list(first.block_table)
    sched.remove(first)  # finished: its blocks go back to the pool but stay cached
    second = _make_seq(1, 10, 1)
    sched.add(second)
    (r,) = sched.schedule()
    assert second.num_computed_tokens == 8 and r.num_tokens == 2  # two full blocks reused
    assert second.block_table[:2] == first_table[:2]
    assert bm.prefix_cache_hit_rate == 8 / 20

