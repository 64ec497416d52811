"""Property tests of the block manager and scheduler, driven without a model: random arrivals,
aborts, finishes, forks, preemptions and swaps under memory pressure never leak or double-free a
block, reference counts equal the live block-table references, every request finishes or is
aborted, and a sequence only ever reads cache slots that hold its own tokens at their positions
(through prefix caching, copy-on-write, swapping and sliding-window release). The last test
runs a sliding-window model and checks released blocks against transformers' tokens."""

from collections import Counter

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve import LLM, SamplingParams as Params
from lmserve.engine.block_manager import COPY, NO_BLOCK, SWAP_IN, SWAP_OUT, BlockManager
from lmserve.engine.scheduler import MIN_PREFILL_CHUNK, Scheduler
from lmserve.engine.sequence import Request, Sequence, SequenceStatus
from lmserve.sampling_params import SamplingParams
from tests.probes import used_blocks_per_step


def _check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = Counter(b for s in live for b in s.block_table if b != NO_BLOCK)
    assert all(bm.ref_counts[b] == n for b, n in refs.items()), "ref count differs from table references"
    free = list(bm.free_blocks)
    assert len(free) == len(set(free)), "a block is in the free pool twice"
    assert not set(free) & set(refs), "a referenced block is also free"
    assert len(free) + len(refs) == bm.num_blocks, "a block leaked"
    assert all(bm.ref_counts[b] == 0 for b in free)
    assert all(bm.block_hash[b] == h for h, b in bm.cached.items()), "prefix-cache map inconsistent"
    swapped = [b for s in live for b in s.swap_table if b != NO_BLOCK]
    assert len(swapped) == len(set(swapped)), "a swap block is held twice"
    assert not set(swapped) & set(bm.free_swap_blocks), "a held swap block is also free"
    assert len(swapped) + len(bm.free_swap_blocks) == bm.num_swap_blocks, "a swap block leaked"


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
       vocab=st.integers(1, 3), speculate=st.integers(0, 3))
def test_random_workloads_never_leak_blocks(requests, num_blocks, block_size, budget, max_seqs,
                                            prefix_caching, vocab, speculate):
    """`speculate` > 0: decoding sequences get up to that many proposals a step, of which a
    varying number is accepted (the rest rolled back), as speculative decoding does."""
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
        for seq in sched.running:  # proposals, as the speculator makes them
            room = min(speculate, capacity - seq.num_tokens - 1, seq.params.max_tokens - seq.num_output_tokens - 1)
            decoding = seq.num_tokens - seq.num_computed_tokens == 1
            seq.spec_token_ids = [(seq.num_tokens + j) % vocab for j in range(room)] if decoding else []
        scheduled = sched.schedule()
        assert sum(r.num_tokens for r in scheduled) <= budget
        assert len(sched.running) <= max_seqs
        for r in scheduled:
            seq, c = r.seq, r.seq.num_computed_tokens
            tokens = seq.token_ids + seq.spec_token_ids
            assert bm.blocks_for(c + r.num_tokens) <= len(seq.block_table)
            for p in range(c):  # context read by attention must be this sequence's own tokens
                assert slot_content.get(bm.slot(seq, p)) == (seq.token_ids[p], p)
            for p in range(c, c + r.num_tokens):
                slot = bm.slot(seq, p)
                block = seq.block_table[p // block_size]
                assert bm.ref_counts[block] == 1 or slot_content.get(slot) == (tokens[p], p), \
                    "a write into a shared block would change another sequence's context"
                slot_content[slot] = (tokens[p], p)
        for r in sched.update_from_output(scheduled):
            seq = r.seq
            if r.num_spec_tokens:
                accepted = (step + seq.seq_id) % (r.num_spec_tokens + 1)
                seq.token_ids.extend(seq.spec_token_ids[:accepted])
                seq.token_ids.append(7)
                sched.accept_proposals(seq, accepted)
            else:
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


@pytest.mark.parametrize("decoding, chunk", [(0, 2048), (1, 1024), (3, 512), (5, 341), (40, MIN_PREFILL_CHUNK)])
def test_prompt_chunks_shrink_as_more_streams_decode(decoding, chunk):
    """While D sequences decode, a step takes at most budget / (D + 1) prompt tokens (at least
    MIN_PREFILL_CHUNK), so the decoding streams' steps stay short; every stream still decodes in
    every step, and the prompt is done in ceil(prompt / chunk) steps."""
    bm = BlockManager(4096, 16)
    sched = Scheduler(bm, 64, 2048)
    streams = [_make_seq(i, 4, 100) for i in range(decoding)]
    for seq in streams:
        sched.add(seq)
    for r in sched.schedule():  # their prompts, then they decode
        r.seq.num_computed_tokens += r.num_tokens
        r.seq.token_ids.append(1)
    prompt = _make_seq(decoding, 3000, 1)
    sched.add(prompt)
    steps = 0
    while prompt.num_computed_tokens < prompt.num_tokens:
        step = {r.seq: r.num_tokens for r in sched.schedule()}
        assert all(step[s] == 1 for s in streams)
        assert step[prompt] == min(chunk, prompt.num_tokens - prompt.num_computed_tokens)
        for seq, n in step.items():
            seq.num_computed_tokens += n
            if seq is not prompt:
                seq.token_ids.append(1)
        steps += 1
    assert steps == -(-3000 // chunk)


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



class _SimulatedCache:
    """What a model runner would hold: device and swap slots -> (token, position) written there."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.device: dict[int, tuple[int, int]] = {}
        self.swap: dict[int, tuple[int, int]] = {}

    def _move(self, source: dict, target: dict, pairs) -> None:
        bs = self.block_size
        gathered = [[source.get(src * bs + o) for o in range(bs)] for src, _ in pairs]  # sources first
        for (_, dst), contents in zip(pairs, gathered):
            for o, content in enumerate(contents):
                target[dst * bs + o] = content

    def run(self, ops) -> None:
        for kind, pairs in ops:
            source, target = {COPY: (self.device, self.device), SWAP_OUT: (self.device, self.swap),
                              SWAP_IN: (self.swap, self.device)}[kind]
            self._move(source, target, pairs)


workloads = st.lists(
    st.tuples(st.integers(1, 30), st.integers(1, 20), st.integers(0, 6), st.booleans(), st.integers(1, 3)),
    min_size=2, max_size=10)


@settings(max_examples=100, deadline=None)
@given(requests=workloads, num_blocks=st.integers(4, 16), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(1, 48), prefix_caching=st.booleans(), mode=st.sampled_from(["recompute", "swap"]),
       num_swap_blocks=st.integers(0, 12), window=st.sampled_from([None, 3, 6]))
def test_forks_swaps_and_windows_never_leak_or_read_foreign_slots(requests, num_blocks, block_size, budget,
                                                                   prefix_caching, mode, num_swap_blocks,
                                                                   window):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching,
                      num_swap_blocks=num_swap_blocks if mode == "swap" else 0, sliding_window=window)
    max_seqs = 8
    sched = Scheduler(bm, max_seqs, budget, preemption_mode=mode)
    capacity = num_blocks * block_size
    pending = []
    for i, (prompt_len, max_tokens, arrive_step, abort, width) in enumerate(requests):
        prompt_len = min(prompt_len, capacity - 1)
        max_tokens = min(max_tokens, capacity - prompt_len)
        seq = _make_seq(i, prompt_len, max_tokens)
        seq.token_ids = [t % 3 for t in range(i % 2, i % 2 + prompt_len)]
        seq.request.width = width
        pending.append((arrive_step, seq, abort))
    aborting = {seq.request.request_id for _, seq, abort in pending if abort}
    cache = _SimulatedCache(block_size)
    live: list[Sequence] = []
    finished: set[str] = set()
    next_id = len(requests)
    for step in range(3000):
        for arrive_step, seq, _ in pending:
            if arrive_step == step:
                sched.add(seq)
                live.append(seq)
        scheduled = sched.schedule()
        cache.run(scheduled.block_ops)
        assert sum(r.num_tokens for r in scheduled) <= budget
        assert len(sched.running) <= max_seqs
        for r in scheduled:
            seq, c = r.seq, r.seq.num_computed_tokens
            first_read = 0 if window is None else max(0, c - window + 1)
            for p in range(first_read, c):
                assert cache.device.get(bm.slot(seq, p)) == (seq.token_ids[p], p), "read a foreign slot"
            for p in range(c, c + r.num_tokens):
                assert bm.ref_counts[seq.block_table[p // block_size]] == 1, "wrote into a shared block"
                cache.device[bm.slot(seq, p)] = (seq.token_ids[p], p)
        for r in scheduled:
            r.seq.num_computed_tokens += r.num_tokens
            bm.register_full_blocks(r.seq)
        for r in scheduled:
            seq = r.seq
            if seq.num_computed_tokens != seq.num_tokens:
                continue
            request = seq.request
            for _ in range(request.pending_forks):  # what the engine does at the prompt's end
                child = Sequence(next_id, request, len(request.seqs), list(seq.token_ids), seq.num_prompt_tokens,
                                 generator=None)
                next_id += 1
                request.seqs.append(child)
                sched.fork(seq, child)
                live.append(child)
                child.token_ids.append(child.index % 3)  # siblings diverge
            request.forked = True
            seq.token_ids.append(seq.index % 3)
        for seq in list(live):
            request = seq.request
            done = seq.num_output_tokens >= request.params.max_tokens
            if request.request_id in aborting and seq.num_output_tokens >= 1:
                done = True
            if done:
                seq.status = SequenceStatus.FINISHED
                sched.remove(seq)
                live.remove(seq)
                if request.is_finished:
                    finished.add(request.request_id)
        _check_invariants(bm, live)
        if not sched.has_unfinished() and step > max(a for a, _, _ in pending):
            break
    assert finished == {s.request.request_id for _, s, _ in pending}, "some request never finished"
    assert bm.num_free_blocks == num_blocks and len(bm.free_swap_blocks) == bm.num_swap_blocks


def test_fork_shares_every_block_and_copies_the_partial_one_on_write():
    bm = BlockManager(16, 4)
    parent = _make_seq(0, 10, 4)
    assert bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    child = Sequence(1, parent.request, 1, list(parent.token_ids), 10, generator=None)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.num_used_blocks == 3
    assert all(bm.ref_counts[b] == 2 for b in parent.block_table)
    parent.token_ids.append(1)
    child.token_ids.append(2)
    assert bm.allocate(child, 11)  # writes position 10, inside the shared partial block
    assert bm.take_block_ops() == [(COPY, [(parent.block_table[2], child.block_table[2])])]
    assert child.block_table[:2] == parent.block_table[:2] and child.block_table[2] != parent.block_table[2]
    assert bm.allocate(parent, 11) and bm.take_block_ops() == []  # now the parent's alone: no copy
    assert bm.num_used_blocks == 4


def test_swap_out_and_in_round_trip_and_full_swap_space_falls_back_to_recompute():
    bm = BlockManager(8, 4, num_swap_blocks=3)
    sched = Scheduler(bm, 8, 64, preemption_mode="swap")
    a, b = _make_seq(0, 10, 4), _make_seq(1, 10, 4)
    for seq in (a, b):
        sched.add(seq)
    sched.schedule()
    for seq in (a, b):
        seq.num_computed_tokens = 10
        seq.token_ids.append(1)
    sched._preempt(b)  # its 3 blocks fit the swap space
    assert b.status == SequenceStatus.SWAPPED and b.num_computed_tokens == 10
    (kind, pairs), = bm.take_block_ops()
    assert kind == SWAP_OUT and len(pairs) == 3 and bm.num_used_blocks == 3
    sched._preempt(a)  # the swap space is full: recompute
    assert a.status == SequenceStatus.WAITING and a.num_computed_tokens == 0
    assert (sched.num_preemptions, sched.num_swap_outs) == (2, 1)
    scheduled = sched.schedule()
    assert [(r.seq, r.num_tokens) for r in scheduled] == [(a, 11), (b, 1)]
    (kind, pairs), = scheduled.block_ops
    assert kind == SWAP_IN and [dev for _, dev in pairs] == b.block_table and len(bm.free_swap_blocks) == 3


def test_sliding_window_model_releases_blocks_and_matches_transformers(tiny_model_factory):
    directory, hf_model = tiny_model_factory("mistral_sliding")  # window 7
    llm = LLM(str(directory), dtype="float32", quantization="none", block_size=4)
    bm = llm.engine.block_manager
    assert bm.sliding_window == 7
    prompt = [(11 * j) % 300 + 1 for j in range(20)]
    with used_blocks_per_step(llm) as used:
        out = llm.generate([prompt], Params(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, 20:].tolist()
    assert out.outputs[0].token_ids == expected
    # 59 positions computed would need 15 blocks; decoding keeps only the window's (at most 7
    # positions spread over 3 blocks) plus the block being written.
    assert max(used[3:]) <= 4 and bm.num_dropped_blocks >= 11
    assert bm.num_free_blocks == bm.num_blocks
    again = llm.generate([prompt], Params(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == expected  # prefix cache hits on released blocks stay correct
