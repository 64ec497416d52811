"""Property tests of the block manager and scheduler, driven without a model: random arrivals,
aborts and finishes under memory pressure never leak or double-free a block, and every request
finishes or is aborted."""

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


def _make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    request = Request(str(seq_id), None, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))
    seq = Sequence(seq_id, request, 0, list(range(prompt_len)), prompt_len, generator=None)
    request.seqs.append(seq)
    return seq


requests_strategy = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 20), st.integers(0, 6), st.booleans()),
    min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy, num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 8))
def test_random_workloads_never_leak_blocks(requests, num_blocks, block_size, budget, max_seqs):
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_seqs, budget)
    capacity = num_blocks * block_size
    pending = []
    for i, (prompt_len, max_tokens, arrive_step, abort) in enumerate(requests):
        prompt_len = min(prompt_len, capacity - 1)
        max_tokens = min(max_tokens, capacity - prompt_len)  # the engine refuses longer requests
        pending.append((arrive_step, _make_seq(i, prompt_len, max_tokens), abort))
    live: list[Sequence] = []
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
            assert bm.blocks_for(r.seq.num_computed_tokens + r.num_tokens) <= len(r.seq.block_table)
            r.seq.num_computed_tokens += r.num_tokens
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
