"""Candidate pool: the compiled ops against a plain-Python model of the semantics,
CPU vs CUDA equality, save/load, and every bad-argument path."""

from __future__ import annotations

import os
import random

import pytest
import torch

from ouroboros_kernels import CandidatePool, PoolFileError, PoolLookup, extension_info

# ----------------------------------------------------------------------------- model


class ReferencePool:
    """The pool's semantics written as plainly as possible (slot-exact)."""

    def __init__(self, V: int, W: int, L: int) -> None:
        self.V, self.W, self.L = V, W, L
        self.phrases = [[None] * W for _ in range(V)]  # tuple or None (empty)
        self.stamps = [[0] * W for _ in range(V)]
        self.clock = 0

    def insert(self, keys: list[int], phrases: list[list[int]]) -> None:
        for i, (key, phrase) in enumerate(zip(keys, phrases, strict=True)):
            stamp = self.clock + i + 1
            if key == -1 or -1 in phrase:
                continue
            phrase = tuple(phrase)
            row, stamps = self.phrases[key], self.stamps[key]
            if phrase in row:
                stamps[row.index(phrase)] = stamp
                continue
            if None in row:
                slot = row.index(None)
            else:
                slot = min(range(self.W), key=lambda w: (stamps[w], w))
            row[slot], stamps[slot] = phrase, stamp
        self.clock += len(keys)

    def lookup(self, keys: list[int], k: int):
        phrases, counts, slots = [], [], []
        for key in keys:
            order = []
            if key != -1:
                stamps = self.stamps[key]
                order = sorted((w for w in range(self.W) if stamps[w]),
                               key=lambda w: (-stamps[w], w))[:k]
            counts.append(len(order))
            rows = [list(self.phrases[key][w]) for w in order]
            phrases.append(rows + [[-1] * self.L] * (k - len(order)))
            slots.append(order + [-1] * (k - len(order)))
        return phrases, counts, slots

    def refine(self, keys: list[int], slots: list[int], phrases: list[list[int]]) -> None:
        for key, slot, phrase in zip(keys, slots, phrases, strict=True):
            if key == -1 or slot == -1 or -1 in phrase or self.stamps[key][slot] == 0:
                continue
            phrase = tuple(phrase)
            row = self.phrases[key]
            if any(w != slot and row[w] == phrase for w in range(self.W)):
                row[slot], self.stamps[key][slot] = None, 0
            else:
                row[slot] = phrase

    def state(self) -> dict[str, torch.Tensor]:
        empty = [-1] * self.L
        phrases = [[list(p) if p is not None else empty for p in row] for row in self.phrases]
        return {"phrases": torch.tensor(phrases, dtype=torch.int32).view(self.V, self.W, self.L),
                "stamps": torch.tensor(self.stamps, dtype=torch.int64),
                "clock": torch.tensor([self.clock], dtype=torch.int64)}


def assert_state_equal(pool: CandidatePool, expected: dict[str, torch.Tensor], where: str):
    state = pool.state_dict()
    for name in ("phrases", "stamps", "clock"):
        got = state[name].cpu()
        if not torch.equal(got, expected[name]):
            diff = (got != expected[name]).nonzero()[:5].tolist()
            raise AssertionError(f"{where}: {name} differs at {diff}")
    pool._sync_index()  # the CPU pool's first-token index, as its next op would use it
    index = pool._first_tokens
    if index is not None and not torch.equal(index, state["phrases"][:, :, 0]):
        raise AssertionError(f"{where}: the first-token index is stale")


def assert_lookup_equal(result, expected, where: str):
    phrases, counts, slots = result
    assert phrases.dtype == counts.dtype == slots.dtype == torch.int32, where
    assert phrases.cpu().tolist() == expected[0], f"{where}: phrases"
    assert counts.cpu().tolist() == expected[1], f"{where}: counts"
    assert slots.cpu().tolist() == expected[2], f"{where}: slots"


# ----------------------------------------------------------------------------- op streams


def random_phrase(rng: random.Random, L: int, alphabet: int, pad_rate: float) -> list[int]:
    phrase = [rng.randrange(alphabet) for _ in range(L)]
    if rng.random() < pad_rate:
        phrase[rng.randrange(L)] = -1
    return phrase


def random_stream(rng: random.Random, V: int, W: int, L: int, num_ops: int,
                  alphabet: int, max_batch: int, pad_rate: float = 0.05):
    """Yield ("insert", keys, phrases) / ("lookup", keys, k) / ("refine", keys, slots,
    phrases). Tiny alphabets and few keys force repeats, evictions and duplicates;
    refines target occupied slots most of the time (slots are drawn from the model)."""
    for _ in range(num_ops):
        kind = rng.choices(("insert", "lookup", "refine"), weights=(5, 2, 3))[0]
        M = rng.randrange(max_batch + 1)
        hot = rng.sample(range(V), k=min(V, rng.randrange(1, 4)))  # duplicates in a batch
        keys = [rng.choice(hot) if rng.random() < 0.7 else rng.randrange(V) for _ in range(M)]
        keys = [-1 if rng.random() < pad_rate else key for key in keys]
        if kind == "insert":
            yield kind, keys, [random_phrase(rng, L, alphabet, pad_rate) for _ in range(M)]
        elif kind == "lookup":
            yield kind, keys, rng.randrange(1, W + 3)
        else:
            slots = [-1 if rng.random() < pad_rate else rng.randrange(W) for _ in range(M)]
            yield kind, keys, slots, [random_phrase(rng, L, alphabet, pad_rate)
                                      for _ in range(M)]


def as_tensors(op, device, rng: random.Random, L: int):
    """The op's arguments as tensors, with the dtypes the API accepts chosen at random."""
    kind, keys = op[0], op[1]
    keys_t = torch.tensor(keys, dtype=rng.choice((torch.int64, torch.int64, torch.int32)),
                          device=device)
    if kind == "lookup":
        return keys_t, op[2]
    phrases_t = torch.tensor(op[-1], dtype=rng.choice((torch.int32, torch.int64)),
                             device=device).view(len(keys), L)
    if kind == "insert":
        return keys_t, phrases_t
    slots_t = torch.tensor(op[2], dtype=rng.choice((torch.int32, torch.int64)), device=device)
    return keys_t, slots_t, phrases_t


def tied_state(rng: random.Random, V: int, W: int, L: int, alphabet: int) -> ReferencePool:
    """A valid model state whose stamps tie (only reachable through load_state_dict):
    exercises the documented tie-breaks (evict the lowest slot, list the lowest slot first)."""
    model = ReferencePool(V, W, L)
    for key in range(V):
        for w in range(W):
            phrase = tuple(rng.randrange(alphabet + 2) for _ in range(L))
            if rng.random() < 0.7 and phrase not in model.phrases[key]:
                model.phrases[key][w], model.stamps[key][w] = phrase, rng.randrange(1, 3)
    model.clock = 3
    return model


def run_against_model(V, W, L, num_ops, alphabet, max_batch, seed, ties=False):
    rng = random.Random(seed)
    pool = CandidatePool(V, W, L)
    model = ReferencePool(V, W, L)
    if ties:
        model = tied_state(rng, V, W, L, alphabet)
        pool.load_state_dict(model.state())
    for step, op in enumerate(random_stream(rng, V, W, L, num_ops, alphabet, max_batch)):
        where = f"seed {seed} op {step} {op[0]}"
        args = as_tensors(op, "cpu", rng, L)
        validate = rng.random() < 0.2  # the validate=True path must accept all valid input
        if op[0] == "insert":
            pool.insert(*args, validate=validate)
            model.insert(op[1], op[2])
        elif op[0] == "lookup":
            assert_lookup_equal(pool.lookup(*args, validate=validate),
                                model.lookup(op[1], op[2]), where)
        else:
            pool.refine(*args, validate=validate)
            model.refine(op[1], op[2], op[3])
        assert_state_equal(pool, model.state(), where)


@pytest.mark.parametrize(
    "V, W, L, alphabet, max_batch",
    [(1, 1, 1, 3, 6), (3, 2, 1, 3, 8), (4, 3, 2, 2, 12), (6, 5, 3, 2, 16), (2, 4, 2, 3, 40),
     (5, 9, 2, 2, 30), (3, 13, 3, 2, 40), (8, 20, 4, 3, 30), (3, 70, 2, 12, 200)],
)
def test_random_streams_match_model(V, W, L, alphabet, max_batch):
    for seed in range(4):
        run_against_model(V, W, L, num_ops=500, alphabet=alphabet, max_batch=max_batch,
                          seed=seed * 1000 + V * 10 + W, ties=seed == 3)


def test_registered_ops_match_model():
    """The torch.ops path (dispatcher; what torch.compile traces) gives the model's results
    too, and its schema / fake kernels pass torch.library.opcheck."""
    rng = random.Random(5)
    V, W, L = 5, 4, 2
    ops = torch.ops.ouroboros_kernels
    pool, model = CandidatePool(V, W, L), ReferencePool(V, W, L)
    state = pool.state_dict()
    for step, op in enumerate(random_stream(rng, V, W, L, 300, alphabet=3, max_batch=10)):
        args = as_tensors(op, "cpu", rng, L)
        if op[0] == "insert":
            ops.pool_insert(state["phrases"], state["stamps"], state["clock"], *args)
            model.insert(op[1], op[2])
        elif op[0] == "lookup":
            result = ops.pool_lookup(state["phrases"], state["stamps"], *args)
            assert_lookup_equal(result, model.lookup(op[1], op[2]), f"op {step}")
        else:
            ops.pool_refine(state["phrases"], state["stamps"], *args)
            model.refine(op[1], op[2], op[3])
        assert_state_equal(pool, model.state(), f"op {step}")
    copy = {k: v.clone() for k, v in state.items()}
    keys, rows = torch.tensor([1, 3, 1]), torch.tensor([[7, 7], [8, 8], [0, 1]], dtype=torch.int32)
    torch.library.opcheck(ops.pool_lookup.default, (copy["phrases"], copy["stamps"], keys, 3))
    torch.library.opcheck(ops.pool_insert.default,
                          (copy["phrases"], copy["stamps"], copy["clock"], keys, rows))
    torch.library.opcheck(ops.pool_refine.default,
                          (copy["phrases"], copy["stamps"], keys, torch.tensor([0, 1, 2]), rows))


def test_packed_ops_match_model():
    """The packed-layout ops (the CPU pool's buffer: stamps, first-token index, phrases per
    key), through the dispatcher: the model's results, the index kept equal to the phrases'
    first tokens, and torch.library.opcheck on their schemas and fake kernels."""
    rng = random.Random(7)
    V, W, L = 4, 9, 2
    ops = torch.ops.ouroboros_kernels
    pool, model = CandidatePool(V, W, L), ReferencePool(V, W, L)
    record, clock, index = pool._record, pool.state_dict()["clock"], pool._first_tokens
    for step, op in enumerate(random_stream(rng, V, W, L, 300, alphabet=2, max_batch=12)):
        args = as_tensors(op, "cpu", rng, L)
        if op[0] == "insert":
            ops.pool_insert_packed(record, clock, W, L, *args)
            model.insert(op[1], op[2])
        elif op[0] == "lookup":
            result = ops.pool_lookup_packed(record, W, L, *args)
            assert_lookup_equal(result, model.lookup(op[1], op[2]), f"op {step}")
        else:
            ops.pool_refine_packed(record, W, L, *args)
            model.refine(op[1], op[2], op[3])
        assert torch.equal(index, pool.state_dict()["phrases"][:, :, 0]), f"op {step}"
        assert_state_equal(pool, model.state(), f"op {step}")
    copy, copy_clock = record.clone(), clock.clone()
    keys, rows = torch.tensor([1, 3, 1]), torch.tensor([[7, 7], [8, 8], [0, 1]], dtype=torch.int32)
    torch.library.opcheck(ops.pool_insert_packed.default, (copy, copy_clock, W, L, keys, rows))
    torch.library.opcheck(ops.pool_lookup_packed.default, (copy, W, L, keys, 3))
    torch.library.opcheck(ops.pool_refine_packed.default,
                          (copy, W, L, keys, torch.tensor([0, 1, 2]), rows))


def test_pool_under_torch_compile():
    """A compiled function using the pool (the registered packed ops on the CPU buffer)
    gives the eager results and leaves the index consistent."""
    pool, ref = CandidatePool(50, 4, 2), CandidatePool(50, 4, 2)

    def step(keys, phrases, out):
        pool.insert(keys, phrases)
        pool.refine(keys[:1], torch.tensor([0]), phrases[3:])
        return pool.lookup(keys[:2], 3), pool.lookup(keys[:2], 3, out=out)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    keys = torch.tensor([1, 2, 1, 3])
    phrases = torch.tensor([[5, 6], [7, 8], [9, 9], [1, 1]])
    got, got_out = compiled(keys, phrases, pool.empty_lookup(2, 3))
    ref.insert(keys, phrases)
    ref.refine(keys[:1], torch.tensor([0]), phrases[3:])
    expected = ref.lookup(keys[:2], 3)
    for a, b, c in zip(got, got_out, expected, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(pool.state_dict()[name], tensor), name
    assert torch.equal(pool._first_tokens, pool.state_dict()["phrases"][:, :, 0])


def test_state_written_through_views_is_seen_by_the_index():
    """The CPU state lives in one buffer (records per key) behind strided views; writing
    into the views from outside (allowed, not the checked way) must not leave the pool's
    first-token index stale: the next insert of that phrase finds it (no duplicate)."""
    pool = CandidatePool(6, 4, 3)
    state = pool.state_dict()
    assert not state["phrases"].is_contiguous()  # views of the record buffer
    assert state["phrases"].untyped_storage().data_ptr() == \
        state["stamps"].untyped_storage().data_ptr()
    state["phrases"][2, 1] = torch.tensor([5, 4, 3], dtype=torch.int32)
    state["stamps"][2, 1] = 7
    state["clock"].fill_(7)
    pool.insert(torch.tensor([2]), torch.tensor([[5, 4, 3]]))
    phrases, counts, slots = pool.lookup(torch.tensor([2]), 4)
    assert counts.tolist() == [1] and slots[0, 0].item() == 1
    assert pool.state_dict()["stamps"][2, 1].item() == 8
    # ... and a refine into a phrase written that way is recognised as a duplicate.
    state["phrases"][2, 3] = torch.tensor([1, 1, 1], dtype=torch.int32)
    state["stamps"][2, 3] = 3
    pool.refine(torch.tensor([2]), torch.tensor([1]), torch.tensor([[1, 1, 1]]))
    assert pool.lookup(torch.tensor([2]), 4).counts.tolist() == [1]
    assert pool.state_dict()["stamps"][2, 1].item() == 0


def test_generic_ops_on_the_views_are_seen_by_the_index():
    """The generic ops on a CPU pool's state_dict() views (strided into its buffer) bump
    the version counter, so the pool rebuilds its first-token index before its next op."""
    ops = torch.ops.ouroboros_kernels
    pool = CandidatePool(4, 3, 2)
    state = pool.state_dict()
    ops.pool_insert(state["phrases"], state["stamps"], state["clock"], torch.tensor([1]),
                    torch.tensor([[4, 5]]))
    pool.insert(torch.tensor([1]), torch.tensor([[4, 5]]))  # found, not duplicated
    assert pool.lookup(torch.tensor([1]), 3).counts.tolist() == [1]
    assert state["stamps"][1].tolist() == [2, 0, 0]


def test_deepcopy_is_an_independent_pool():
    """copy.deepcopy copies the buffer and rebinds the copy's ops to its own buffer."""
    import copy

    pool = filled_pool()
    twin = copy.deepcopy(pool)
    for name, tensor in pool.state_dict().items():
        assert torch.equal(twin.state_dict()[name], tensor)
    twin.insert(torch.tensor([3]), torch.tensor([[7, 7, 7]]))
    before = pool.lookup(torch.tensor([3]), 4)
    after = twin.lookup(torch.tensor([3]), 4)
    assert after.phrases[0, 0].tolist() == [7, 7, 7]
    assert before.phrases[0, 0].tolist() != [7, 7, 7]
    assert twin._record.data_ptr() != pool._record.data_ptr()


def test_pool_made_and_used_under_inference_mode():
    with torch.inference_mode():
        pool = CandidatePool(4, 3, 2)
        pool.insert(torch.tensor([1, 1]), torch.tensor([[2, 3], [2, 3]]))
        assert pool.lookup(torch.tensor([1]), 3).counts.tolist() == [1]
        pool.state_dict()["stamps"][1, 2] = 9  # an outside write under inference mode ...
        pool.state_dict()["phrases"][1, 2] = torch.tensor([4, 4], dtype=torch.int32)
        pool.state_dict()["clock"].fill_(9)
    pool.insert(torch.tensor([1]), torch.tensor([[4, 4]]))  # ... is seen by the index
    assert pool.lookup(torch.tensor([1]), 3).counts.tolist() == [2]
    with torch.inference_mode():  # the ops on inference tensors, called outside the mode
        state = {k: v.clone() for k, v in pool.state_dict().items()}
    torch.ops.ouroboros_kernels.pool_insert(state["phrases"], state["stamps"], state["clock"],
                                            torch.tensor([2]), torch.tensor([[1, 2]]))
    assert state["stamps"][2].tolist() == [11, 0, 0]


def test_hand_checked_sequence():
    """A short sequence worked out by hand (independent of the model above)."""
    pool = CandidatePool(4, 3, 2)
    t = lambda rows: torch.tensor(rows)  # noqa: E731
    pool.insert(t([1, 1, 1, 1, 2]), t([[1, 2], [3, 4], [1, 2], [5, 6], [7, 7]]))
    # key 1: [1,2] stamps 1 then 3 (re-insert), [3,4] stamp 2, [5,6] stamp 4
    phrases, counts, slots = pool.lookup(t([1, 2, -1, 0]), 4)
    assert counts.tolist() == [3, 1, 0, 0]
    assert phrases[0].tolist() == [[5, 6], [1, 2], [3, 4], [-1, -1]]
    assert slots[0].tolist() == [2, 0, 1, -1]
    assert pool.state_dict()["clock"].tolist() == [5]
    pool.insert(t([1]), t([[9, 9]]))  # key full: evicts [3,4] (stamp 2, slot 1)
    assert pool.lookup(t([1]), 3).slots.tolist() == [[1, 2, 0]]
    pool.refine(t([1]), t([0]), t([[5, 6]]))  # duplicate of slot 2: slot 0 emptied
    assert pool.lookup(t([1]), 3).phrases.tolist() == [[[9, 9], [5, 6], [-1, -1]]]
    pool.refine(t([1]), t([2]), t([[4, 4]]))  # in place, recency kept
    assert pool.lookup(t([1]), 2).phrases.tolist() == [[[9, 9], [4, 4]]]
    pool.refine(t([1]), t([0]), t([[8, 8]]))  # empty slot: no-op
    assert pool.num_phrases() == 3


def test_eviction_order_is_lru_of_inserts_not_reads():
    pool = CandidatePool(2, 2, 1)
    pool.insert(torch.tensor([0, 0]), torch.tensor([[10], [11]]))
    for _ in range(3):
        pool.lookup(torch.tensor([0]), 2)  # reads change nothing
    pool.insert(torch.tensor([0]), torch.tensor([[12]]))
    assert pool.lookup(torch.tensor([0]), 2).phrases.flatten().tolist() == [12, 11]


def test_insert_ngrams_matches_model():
    rng = random.Random(7)
    V, W, L = 6, 3, 3
    pool, model = CandidatePool(V, W, L), ReferencePool(V, W, L)
    for length in (0, 1, L, L + 1, 17, 60):
        tokens = [rng.randrange(V) for _ in range(length)]
        pool.insert_ngrams(torch.tensor(tokens, dtype=torch.int64))
        count = max(0, length - L)
        model.insert(tokens[:count], [tokens[t + 1:t + 1 + L] for t in range(count)])
        assert_state_equal(pool, model.state(), f"length {length}")
    pool.insert_ngrams(torch.tensor([1, 2, 3, 4], dtype=torch.int32), n=L + 1)
    model.insert([1], [[2, 3, 4]])
    assert_state_equal(pool, model.state(), "int32 tokens")


def test_large_batch_and_wide_pool_match_model():
    """Batches beyond the CUDA chunk size (2048) and W > 32 exercise the same code paths on
    the CPU that the GPU test checks on CUDA."""
    rng = random.Random(11)
    V, W, L = 5, 40, 2
    pool, model = CandidatePool(V, W, L), ReferencePool(V, W, L)
    M = 5000
    keys = [rng.randrange(V) for _ in range(M)]
    phrases = [[rng.randrange(8), rng.randrange(8)] for _ in range(M)]
    pool.insert(torch.tensor(keys), torch.tensor(phrases))
    model.insert(keys, phrases)
    assert_state_equal(pool, model.state(), "large batch")
    assert_lookup_equal(pool.lookup(torch.tensor([0, 4, 2]), 45),
                        model.lookup([0, 4, 2], 45), "wide lookup")


def test_lookup_k_larger_than_capacity_and_empty_batches():
    pool = CandidatePool(3, 2, 2)
    pool.insert(torch.tensor([0]), torch.tensor([[1, 1]]))
    phrases, counts, slots = pool.lookup(torch.tensor([0]), 5)
    assert phrases.shape == (1, 5, 2) and counts.tolist() == [1]
    assert slots.tolist() == [[0, -1, -1, -1, -1]]
    phrases, counts, slots = pool.lookup(torch.empty(0, dtype=torch.int64), 3)
    assert phrases.shape == (0, 3, 2) and counts.shape == (0,) and slots.shape == (0, 3)
    pool.insert(torch.empty(0, dtype=torch.int64), torch.empty(0, 2, dtype=torch.int32))
    pool.refine(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                torch.empty(0, 2, dtype=torch.int32))
    assert pool.state_dict()["clock"].tolist() == [1]


def test_padding_entries_consume_stamps_and_do_nothing():
    pool = CandidatePool(3, 2, 2)
    pool.insert(torch.tensor([-1, 0, 1]), torch.tensor([[5, 5], [1, -1], [2, 2]]))
    assert pool.state_dict()["stamps"].tolist() == [[0, 0], [3, 0], [0, 0]]
    assert pool.state_dict()["clock"].tolist() == [3]
    pool.refine(torch.tensor([1, -1, 1]), torch.tensor([0, 0, -1]),
                torch.tensor([[-1, 3], [4, 4], [4, 4]]))
    assert pool.lookup(torch.tensor([1]), 1).phrases.tolist() == [[[2, 2]]]


def test_non_contiguous_arguments():
    pool, model = CandidatePool(4, 3, 2), ReferencePool(4, 3, 2)
    keys = torch.tensor([[0, 9], [1, 9], [0, 9]])[:, 0]
    phrases = torch.tensor([[1, 2], [3, 4], [5, 6]]).t().contiguous().t()
    pool.insert(keys, phrases)
    model.insert([0, 1, 0], [[1, 2], [3, 4], [5, 6]])
    assert_state_equal(pool, model.state(), "non-contiguous")


def test_failed_insert_changes_nothing():
    pool = CandidatePool(4, 2, 2)
    pool.insert(torch.tensor([0]), torch.tensor([[1, 2]]))
    before = {k: v.clone() for k, v in pool.state_dict().items()}
    with pytest.raises(ValueError, match="keys"):
        pool.insert(torch.tensor([1, 2, 4]), torch.tensor([[1, 2], [3, 4], [5, 6]]))
    with pytest.raises(ValueError, match="phrases"):
        pool.insert(torch.tensor([1, 2]), torch.tensor([[1, 2], [3, -2]]))
    with pytest.raises(ValueError, match="slots"):
        pool.refine(torch.tensor([0, 0]), torch.tensor([0, 2]), torch.tensor([[7, 7], [8, 8]]))
    for name, tensor in pool.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_clear_to_repr_and_stats():
    pool = CandidatePool(5, 4, 3)
    assert repr(pool) == "CandidatePool(vocab_size=5, capacity=4, phrase_len=3, device='cpu')"
    assert (pool.vocab_size, pool.capacity, pool.phrase_len) == (5, 4, 3)
    # One record per key: W stamps (8 B), W first tokens (4 B), W phrases (4L B), padded to
    # 64 B (4 * (8 + 4 + 12) = 96 -> 128), and the clock.
    assert pool.nbytes == 5 * 128 + 8
    pool.insert_ngrams(torch.arange(5).repeat(3))
    assert pool.num_phrases() == 5
    assert pool.to("cpu") is pool and pool.device == torch.device("cpu")
    pool.clear()
    assert pool.num_phrases() == 0 and pool.state_dict()["clock"].item() == 0
    assert (pool.state_dict()["phrases"] == -1).all()


def test_extension_info():
    info = extension_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    for name in ("pool_insert", "pool_lookup", "pool_refine"):
        assert "cpu" in info["ops"][name]
        assert ("cuda" in info["ops"][name]) == info["built_with_cuda"]
    assert (info["cuda_version"] is None) == (not info["built_with_cuda"])


def test_missing_extension_says_how_to_build(monkeypatch):
    from ouroboros_kernels import _ext

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", ImportError("no module named _C"))
    with pytest.raises(ImportError, match="build_ext --inplace"):
        extension_info()


# ----------------------------------------------------------------------------- bad arguments


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        CandidatePool(0, 2, 2)
    with pytest.raises(ValueError, match="capacity"):
        CandidatePool(4, 0, 2)
    with pytest.raises(ValueError, match="phrase_len"):
        CandidatePool(4, 2, -1)
    with pytest.raises(TypeError, match="capacity"):
        CandidatePool(4, 2.0, 2)
    with pytest.raises(TypeError, match="vocab_size"):
        CandidatePool(True, 2, 2)


@pytest.mark.parametrize("validate", [False, True])
def test_bad_lookup_arguments(validate):
    pool = CandidatePool(10, 3, 2)
    good = torch.tensor([1, 2])
    cases = [
        ([1, 2], 2, TypeError, "keys"),
        (torch.tensor([1.0, 2.0]), 2, TypeError, "keys"),
        (torch.tensor([1, 2], dtype=torch.int16), 2, TypeError, "keys"),
        (torch.tensor([[1, 2]]), 2, ValueError, "keys"),
        (torch.tensor(3), 2, ValueError, "keys"),
        (torch.tensor([1, 10]), 2, ValueError, "keys"),
        (torch.tensor([-2]), 2, ValueError, "keys"),
        (torch.tensor([1], device="meta"), 2, ValueError, "keys"),
        (good, 0, ValueError, "k"),
        (good, -3, ValueError, "k"),
        (good, 2.0, TypeError, "k"),
        (good, True, TypeError, "k"),
    ]
    for keys, k, error, name in cases:
        with pytest.raises(error, match=f"^{name}"):
            pool.lookup(keys, k, validate=validate)


def test_lookup_into_buffers_matches_allocating_lookup():
    """lookup(..., out=...) writes exactly the allocating lookup's result into poisoned
    buffers, returns them, and buffers reused across calls and ops stay correct."""
    rng = random.Random(11)
    V, W, L = 6, 5, 3
    pool, model = CandidatePool(V, W, L), ReferencePool(V, W, L)
    reused = {}
    for step, op in enumerate(random_stream(rng, V, W, L, 1500, 2, 12)):
        args = as_tensors(op, "cpu", rng, L)
        if op[0] == "insert":
            pool.insert(*args)
            model.insert(op[1], op[2])
        elif op[0] == "refine":
            pool.refine(*args)
            model.refine(op[1], op[2], op[3])
        else:
            keys, k = args
            where = f"op {step} lookup"
            fresh = pool.empty_lookup(len(op[1]), k)
            for buffer in fresh:
                buffer.fill_(-7)
            got = pool.lookup(keys, k, out=fresh, validate=rng.random() < 0.2)
            assert got is fresh, where
            assert_lookup_equal(got, model.lookup(op[1], k), where)
            buffers = reused.setdefault((len(op[1]), k), pool.empty_lookup(len(op[1]), k))
            as_tuple = tuple(buffers) if rng.random() < 0.5 else list(buffers)
            got = pool.lookup(keys, k, out=as_tuple)  # a plain tuple/list of tensors works
            assert isinstance(got, PoolLookup) and got.phrases is buffers.phrases, where
            assert_lookup_equal(buffers, model.lookup(op[1], k), where)
    assert len(reused) > 10


@pytest.mark.parametrize("validate", [False, True])
def test_bad_lookup_out_arguments(validate):
    pool = CandidatePool(10, 3, 2)
    keys = torch.tensor([1, 2])
    good = pool.empty_lookup(2, 4)
    assert [tuple(t.shape) for t in good] == [(2, 4, 2), (2,), (2, 4)]
    assert all(t.dtype == torch.int32 for t in good)
    i32 = torch.int32
    cases = [
        ("nope", TypeError, "out"),
        (good[:2], TypeError, "out"),
        ((good.phrases, [0, 0], good.slots), TypeError, "out.counts"),
        (good._replace(phrases=good.phrases.long()), TypeError, "out.phrases"),
        (good._replace(counts=torch.empty(3, dtype=i32)), ValueError, "out.counts"),
        (good._replace(slots=torch.empty(2, 3, dtype=i32)), ValueError, "out.slots"),
        (pool.empty_lookup(2, 3), ValueError, "out.phrases"),  # k mismatch
        (pool.empty_lookup(1, 4), ValueError, "out.phrases"),  # M mismatch
        (good._replace(slots=torch.empty(4, 2, dtype=i32).t()), ValueError, "out.slots"),
        (good._replace(counts=torch.empty(2, dtype=i32, device="meta")), ValueError,
         "out.counts"),
    ]
    for out, error, name in cases:
        with pytest.raises(error, match=f"^{name}"):
            pool.lookup(keys, 4, out=out, validate=validate)
    with pytest.raises(ValueError, match="^keys"):  # the keys are still checked first
        pool.lookup(torch.tensor([1, 10]), 4, out=good, validate=validate)
    with pytest.raises(ValueError, match="^num_keys"):
        pool.empty_lookup(-1, 2)
    with pytest.raises(ValueError, match="^k"):
        pool.empty_lookup(1, 0)


def test_large_pool_state_and_huge_page_advice():
    """Pools above the huge-page threshold (the state is advised to use 2 MiB pages before
    first touch) start empty and work like small ones."""
    V, W, L = 70000, 4, 2  # phrases 2.2 MB, stamps 2.2 MB
    pool = CandidatePool(V, W, L)
    assert bool((pool.state_dict()["phrases"] == -1).all())
    assert not bool(pool.state_dict()["stamps"].any())
    keys = torch.tensor([0, V - 1, V // 2, V - 1])
    phrases = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    pool.insert(keys, phrases)
    got = pool.lookup(torch.tensor([V - 1, 0, 5]), 2)
    assert got.phrases.tolist() == [[[7, 8], [3, 4]], [[1, 2], [-1, -1]], [[-1, -1], [-1, -1]]]
    assert got.counts.tolist() == [2, 1, 0]


@pytest.mark.parametrize("validate", [False, True])
def test_bad_insert_arguments(validate):
    pool = CandidatePool(10, 3, 2)
    keys = torch.tensor([1, 2])
    phrases = torch.tensor([[1, 2], [3, 4]])
    cases = [
        (keys.float(), phrases, TypeError, "keys"),
        (torch.tensor([1, 11]), phrases, ValueError, "keys"),
        (torch.tensor([1, -5]), phrases, ValueError, "keys"),
        (keys, phrases.float(), TypeError, "phrases"),
        (keys, phrases.to(torch.uint8), TypeError, "phrases"),
        (keys, phrases[:1], ValueError, "phrases"),
        (keys, torch.tensor([[1, 2, 3], [4, 5, 6]]), ValueError, "phrases"),
        (keys, torch.tensor([1, 2]), ValueError, "phrases"),
        (keys, torch.tensor([[1, 2], [3, -7]]), ValueError, "phrases"),
        (keys, torch.tensor([[1, 2], [3, 2**31]]), ValueError, "phrases"),
        (keys, phrases.to("meta"), ValueError, "phrases"),
        (keys, [[1, 2], [3, 4]], TypeError, "phrases"),
    ]
    for k, p, error, name in cases:
        with pytest.raises(error, match=f"^{name}"):
            pool.insert(k, p, validate=validate)
    assert pool.num_phrases() == 0


@pytest.mark.parametrize("validate", [False, True])
def test_bad_refine_arguments(validate):
    pool = CandidatePool(10, 3, 2)
    keys, slots = torch.tensor([1, 2]), torch.tensor([0, 1])
    phrases = torch.tensor([[1, 2], [3, 4]])
    cases = [
        (keys, slots.float(), phrases, TypeError, "slots"),
        (keys, torch.tensor([0]), phrases, ValueError, "slots"),
        (keys, torch.tensor([[0, 1]]), phrases, ValueError, "slots"),
        (keys, torch.tensor([0, 3]), phrases, ValueError, "slots"),
        (keys, torch.tensor([0, -2]), phrases, ValueError, "slots"),
        (keys, slots.to("meta"), phrases, ValueError, "slots"),
        (torch.tensor([1, 10]), slots, phrases, ValueError, "keys"),
        (keys, slots, phrases[:, :1], ValueError, "phrases"),
        (keys, slots, torch.tensor([[1, 2], [-3, 4]]), ValueError, "phrases"),
    ]
    for k, s, p, error, name in cases:
        with pytest.raises(error, match=f"^{name}"):
            pool.refine(k, s, p, validate=validate)


def test_bad_insert_ngrams_arguments():
    pool = CandidatePool(10, 3, 2)
    with pytest.raises(ValueError, match="^n"):
        pool.insert_ngrams(torch.arange(5), n=4)
    with pytest.raises(ValueError, match="^n"):
        pool.insert_ngrams(torch.arange(5), n=1)
    with pytest.raises(TypeError, match="^n"):
        pool.insert_ngrams(torch.arange(5), n=3.0)
    with pytest.raises(ValueError, match="^tokens"):
        pool.insert_ngrams(torch.arange(6).view(2, 3))
    with pytest.raises(TypeError, match="^tokens"):
        pool.insert_ngrams(torch.arange(5).float())
    with pytest.raises(ValueError, match="keys"):  # token 12 is a key out of range
        pool.insert_ngrams(torch.tensor([1, 12, 2, 3]))


def test_bad_state_passed_to_the_ops_directly():
    CandidatePool(2, 2, 2)  # loads the extension
    ops = torch.ops.ouroboros_kernels
    phrases = torch.full((4, 3, 2), -1, dtype=torch.int32)
    stamps = torch.zeros(4, 3, dtype=torch.int64)
    clock = torch.zeros(1, dtype=torch.int64)
    keys, rows = torch.tensor([1]), torch.tensor([[1, 2]], dtype=torch.int32)
    with pytest.raises(TypeError, match="pool phrases"):
        ops.pool_insert(phrases.long(), stamps, clock, keys, rows)
    with pytest.raises(ValueError, match="pool stamps"):
        ops.pool_insert(phrases, stamps[:2], clock, keys, rows)
    with pytest.raises(ValueError, match="pool clock"):
        ops.pool_insert(phrases, stamps, torch.zeros(2, dtype=torch.int64), keys, rows)
    with pytest.raises(TypeError, match="keys"):
        ops.pool_lookup(phrases, stamps, keys.float(), 2)
    with pytest.raises(ValueError, match="^k"):
        ops.pool_lookup(phrases, stamps, keys, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.pool_lookup(phrases.transpose(0, 1), stamps.t(), keys, 1)
    with pytest.raises(ValueError, match="contiguous"):  # rows of two keys overlap
        ops.pool_lookup(phrases, stamps.as_strided((4, 3), (2, 1)), keys, 1)
    record = torch.full((4, 16), -1, dtype=torch.int32)  # W = 3, L = 2: R >= 15, even
    with pytest.raises(TypeError, match="pool record: expected int32"):
        ops.pool_insert_packed(record.long(), clock, 3, 2, keys, rows)
    with pytest.raises(ValueError, match="pool record: expected a contiguous"):
        ops.pool_insert_packed(record[:, :14], clock, 3, 2, keys, rows)
    with pytest.raises(ValueError, match="pool record: expected a contiguous"):
        ops.pool_lookup_packed(record, 3, 3, keys, 1)  # 3 * (3 + 3) = 18 > 16
    with pytest.raises(ValueError, match="capacity and phrase_len must be >= 1"):
        ops.pool_refine_packed(record, 0, 2, keys, torch.tensor([0]), rows)


def test_direct_bindings_raise_clear_errors():
    """The direct twins of the ops (vectorcall entry points behind CandidatePool's hot path)
    check their arguments and raise Python errors naming them (never crash on a wrong
    type); a lookup twin with three buffers writes into them, without them it returns the
    op's result."""
    from ouroboros_kernels._ext import load_extension

    module = load_extension()
    phrases = torch.full((3, 2, 2), -1, dtype=torch.int32)
    stamps = torch.zeros(3, 2, dtype=torch.int64)
    clock = torch.zeros(1, dtype=torch.int64)
    keys, rows = torch.tensor([1]), torch.tensor([[1, 2]])
    out = CandidatePool(3, 2, 2).empty_lookup(1, 2)
    record = torch.full((3, 16), -1, dtype=torch.int32)
    record.view(torch.int64)[:, :2] = 0  # W = 2 empty stamps
    with pytest.raises(TypeError, match="pool_insert: expected 5 positional"):
        module.pool_insert(phrases, stamps, clock)
    with pytest.raises(TypeError, match="keys: expected a torch.Tensor, got str"):
        module.pool_insert(phrases, stamps, clock, "x", rows)
    with pytest.raises(TypeError, match="k: expected an int, got bool"):
        module.pool_lookup(phrases, stamps, keys, True, *out)
    with pytest.raises(ValueError, match="k: out of the int64 range"):
        module.pool_lookup(phrases, stamps, keys, 2**70, *out)
    with pytest.raises(ValueError, match="keys: entry 0 is 5"):
        module.pool_insert(phrases, stamps, clock, torch.tensor([5]), rows)
    with pytest.raises(TypeError, match="capacity: expected an int, got float"):
        module.pool_insert_packed(record, clock, 2.0, 2, keys, rows)
    with pytest.raises(TypeError, match="pool_refine_packed: expected 6 positional"):
        module.pool_refine_packed(record, 2, 2, keys, rows)
    with pytest.raises(TypeError, match=r"pool_lookup: expected 4 positional arguments \(or 7"):
        module.pool_lookup(phrases, stamps, keys, 2, *out[:2])
    with pytest.raises(TypeError, match=r"pool_lookup_packed: expected 5 .*\(or 8"):
        module.pool_lookup_packed(record, 2, 2, keys)
    with pytest.raises(TypeError, match="out.slots: expected a torch.Tensor, got NoneType"):
        module.pool_lookup(phrases, stamps, keys, 2, out.phrases, out.counts, None)
    module.pool_insert(phrases, stamps, clock, keys, rows)
    assert module.pool_lookup(phrases, stamps, keys, 2, *out) is None
    assert out.counts.tolist() == [1] and out.phrases[0, 0].tolist() == [1, 2]
    fresh = module.pool_lookup(phrases, stamps, keys, 2)
    assert type(fresh) is tuple and len(fresh) == 3
    for got, want in zip(fresh, out, strict=True):
        assert got.dtype == torch.int32 and torch.equal(got, want)
    module.pool_insert_packed(record, clock, 2, 2, keys, rows)
    assert module.pool_lookup_packed(record, 2, 2, keys, 2, *out) is None
    assert out.counts.tolist() == [1] and out.phrases[0, 0].tolist() == [1, 2]
    for got, want in zip(module.pool_lookup_packed(record, 2, 2, keys, 2), out, strict=True):
        assert torch.equal(got, want)
    assert record[1, 4].item() == 1  # the index holds the first token


def test_bad_load_state_dict():
    pool = CandidatePool(3, 2, 2)
    good = {k: v.clone() for k, v in CandidatePool(3, 2, 2).state_dict().items()}
    with pytest.raises(TypeError, match="state"):
        pool.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="missing"):
        pool.load_state_dict({"phrases": good["phrases"]})
    with pytest.raises(TypeError, match="stamps"):
        pool.load_state_dict({**good, "stamps": good["stamps"].int()})
    with pytest.raises(ValueError, match="phrases"):
        pool.load_state_dict({**good, "phrases": torch.full((3, 2, 3), -1, dtype=torch.int32)})
    stamps = good["stamps"].clone()
    stamps[0, 0] = 5  # occupied slot holding -1s, and a stamp above the clock
    with pytest.raises(ValueError, match="clock"):
        pool.load_state_dict({**good, "stamps": stamps})
    dup = CandidatePool(3, 2, 2)
    dup.insert(torch.tensor([1, 1]), torch.tensor([[1, 2], [3, 4]]))
    state = {k: v.clone() for k, v in dup.state_dict().items()}
    state["phrases"][1, 1] = state["phrases"][1, 0]
    with pytest.raises(ValueError, match="key 1 holds the same phrase twice"):
        pool.load_state_dict(state)
    assert pool.num_phrases() == 0
    pool.load_state_dict({k: v.clone() for k, v in dup.state_dict().items()})
    assert pool.lookup(torch.tensor([1]), 2).phrases.tolist() == [[[3, 4], [1, 2]]]


# ----------------------------------------------------------------------------- save / load


def filled_pool(V=50, W=4, L=3, seed=0) -> CandidatePool:
    rng = random.Random(seed)
    pool = CandidatePool(V, W, L)
    pool.insert_ngrams(torch.tensor([rng.randrange(V) for _ in range(2000)]))
    return pool


def test_save_load_round_trip(tmp_path):
    pool = filled_pool()
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    loaded = CandidatePool.load(path, vocab_size=50, capacity=4, phrase_len=3)
    for name, tensor in pool.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # The loaded pool continues exactly like the original.
    keys, phrases = torch.tensor([1, 2, 1]), torch.tensor([[7, 7, 7], [8, 8, 8], [9, 9, 9]])
    pool.insert(keys, phrases)
    loaded.insert(keys, phrases)
    for name, tensor in pool.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert [p.name for p in tmp_path.iterdir()] == ["pool.safetensors"]  # no temp files left
    pool.save(str(path))  # overwrite in place
    assert torch.equal(CandidatePool.load(str(path)).state_dict()["stamps"],
                       pool.state_dict()["stamps"])


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    pool = filled_pool()
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    data = path.read_bytes()

    with pytest.raises(FileNotFoundError):
        CandidatePool.load(tmp_path / "missing.safetensors")

    def expect(content: bytes, match: str) -> None:
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(content)
        with pytest.raises(PoolFileError, match=match):
            CandidatePool.load(bad)

    expect(data[: len(data) // 2], "not a readable pool file")  # truncated
    expect(data[:5], "not a readable pool file")
    expect(b"", "not a readable pool file")
    expect(os.urandom(4096), "not a readable pool file")  # garbage
    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # a bit flip in the stamps' data
    expect(bytes(flipped), "checksum|clock|phrase|stamp")

    state = {k: v.contiguous() for k, v in pool.state_dict().items()}
    meta = {"format": "ouroboros-candidate-pool", "format_version": "1", "vocab_size": "50",
            "capacity": "4", "phrase_len": "3", "crc32": "0"}

    def expect_tensors(tensors, metadata, match):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata=metadata)
        with pytest.raises(PoolFileError, match=match):
            CandidatePool.load(bad)

    expect_tensors(state, {**meta, "format_version": "2"}, "format version '2'")
    expect_tensors(state, {**meta, "format": "something-else"}, "not an ouroboros")
    expect_tensors(state, None, "not an ouroboros")
    expect_tensors(state, {**meta, "vocab_size": "49"}, r"expected shape \[49, 4, 3\]")
    expect_tensors(state, {**meta, "capacity": "x"}, "bad or missing metadata")
    expect_tensors({**state, "stamps": state["stamps"].int()}, meta, "int64")
    expect_tensors({"phrases": state["phrases"]}, meta, "expected tensors")
    expect_tensors(state, meta, "checksum")  # crc32 "0" is wrong
    with pytest.raises(PoolFileError, match="capacity is 4, expected 5"):
        CandidatePool.load(path, capacity=5)


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    import safetensors.torch

    old = filled_pool(seed=1)
    path = tmp_path / "pool.safetensors"
    old.save(path)
    before = path.read_bytes()
    new = filled_pool(seed=2)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        new.save(path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pool.safetensors"]
    assert torch.equal(CandidatePool.load(path).state_dict()["stamps"],
                       old.state_dict()["stamps"])


# ----------------------------------------------------------------------------- CUDA


def _cuda_pool_available() -> bool:
    return torch.cuda.is_available() and extension_info()["built_with_cuda"]


gpu = pytest.mark.gpu
needs_cuda_ops = pytest.mark.skipif(not _cuda_pool_available(),
                                    reason="needs a GPU and the CUDA build of the extension")


def _poison_cuda_allocator():
    """Fill freed cached blocks with garbage so that an output element the kernel forgets
    to write shows up as garbage rather than a lucky zero or -1."""
    junk = torch.full((1 << 18,), 0x5A5A5A5A, dtype=torch.int32, device="cuda")
    del junk


@pytest.fixture
def insert_variant():
    """Select the CUDA insert path for one test; the default is restored afterwards."""
    from ouroboros_kernels import cuda_insert_cached

    before = cuda_insert_cached()
    yield cuda_insert_cached
    cuda_insert_cached(before)


def test_cuda_insert_cached_switch():
    from ouroboros_kernels import cuda_insert_cached, extension_info

    with pytest.raises(TypeError, match="enabled: expected a bool"):
        cuda_insert_cached(1)
    assert cuda_insert_cached() is False  # off by default
    if not extension_info()["built_with_cuda"]:
        with pytest.raises(ValueError, match="built without CUDA"):
            cuda_insert_cached(True)
        assert cuda_insert_cached(False) is False
    else:
        assert cuda_insert_cached(True) is True
        assert cuda_insert_cached(False) is False


def _compare_pools(cpu_pool, cuda_pool, where):
    for name, tensor in cpu_pool.state_dict().items():
        got = cuda_pool.state_dict()[name]
        assert got.device.type == "cuda", where
        if not torch.equal(got.cpu(), tensor):
            diff = (got.cpu() != tensor).nonzero()[:5].tolist()
            raise AssertionError(f"{where}: {name} differs at {diff}")


@gpu
@needs_cuda_ops
@pytest.mark.parametrize(
    "V, W, L, alphabet, max_batch, num_ops",
    [(1, 1, 1, 3, 6, 400), (4, 3, 2, 2, 12, 600), (6, 5, 3, 2, 40, 600),
     (3, 20, 4, 3, 64, 400), (5, 33, 2, 4, 100, 300), (4, 70, 1, 12, 200, 200),
     (200, 20, 7, 5, 400, 200)],
)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("cached", [False, True])
def test_cuda_matches_cpu_on_random_streams(V, W, L, alphabet, max_batch, num_ops, ties, cached,
                                            insert_variant):
    """Same op stream on both devices (fresh random inputs, dtypes mixed); all state and
    every lookup output compared after every op, with the allocator poisoned first. Both
    CUDA insert paths: the default and the experimental register-cached one."""
    insert_variant(cached)
    rng = random.Random(V * 7919 + W * 31 + L)
    cpu_pool = CandidatePool(V, W, L)
    cuda_pool = CandidatePool(V, W, L, device="cuda")
    if ties:  # start from a state with tied stamps (tie-breaks must agree too)
        start = tied_state(rng, V, W, L, alphabet).state()
        cpu_pool.load_state_dict(start)
        cuda_pool.load_state_dict(start)
    for step, op in enumerate(random_stream(rng, V, W, L, num_ops, alphabet, max_batch)):
        where = f"op {step} {op[0]}"
        cpu_args = as_tensors(op, "cpu", random.Random(step), L)
        cuda_args = as_tensors(op, "cuda", random.Random(step), L)  # same dtypes
        if op[0] == "insert":
            cpu_pool.insert(*cpu_args)
            cuda_pool.insert(*cuda_args)
        elif op[0] == "lookup":
            _poison_cuda_allocator()
            expected = cpu_pool.lookup(*cpu_args)
            got = cuda_pool.lookup(*cuda_args)
            for e, g in zip(expected, got, strict=True):
                assert g.device.type == "cuda" and g.dtype == torch.int32
                assert torch.equal(g.cpu(), e), where
        else:
            cpu_pool.refine(*cpu_args)
            cuda_pool.refine(*cuda_args)
        _compare_pools(cpu_pool, cuda_pool, where)


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("W, cached", [(37, False), (20, False), (20, True)])
def test_cuda_large_batches_cross_chunks(W, cached, insert_variant):
    """Batches of 2048+ entries (several launches) with one key's entries spread across
    chunk boundaries, W > 32 (and W <= 32 on both insert paths), int64 phrases, and
    insert_ngrams of a long sequence."""
    insert_variant(cached)
    gen = torch.Generator().manual_seed(3)
    V, L = 40, 3
    cpu_pool, cuda_pool = CandidatePool(V, W, L), CandidatePool(V, W, L, device="cuda")
    for M in (2047, 2048, 2049, 6000):
        keys = torch.randint(0, V, (M,), generator=gen)
        keys[torch.randint(0, M, (M // 3,), generator=gen)] = 3  # one very hot key
        phrases = torch.randint(0, 6, (M, L), generator=gen)
        cpu_pool.insert(keys, phrases)
        cuda_pool.insert(keys.cuda(), phrases.cuda())
        _compare_pools(cpu_pool, cuda_pool, f"insert M={M}")
        lookup_keys = torch.randint(-1, V, (300,), generator=gen)
        for k in (1, 5, W, W + 40):
            _poison_cuda_allocator()
            for e, g in zip(cpu_pool.lookup(lookup_keys, k),
                            cuda_pool.lookup(lookup_keys.cuda(), k), strict=True):
                assert torch.equal(g.cpu(), e), f"lookup M={M} k={k}"
        found = cpu_pool.lookup(keys[:M], 4).slots
        slot_pick = found[torch.arange(M), torch.randint(0, 4, (M,), generator=gen)]
        refine_phrases = torch.randint(0, 6, (M, L), generator=gen).int()
        cpu_pool.refine(keys, slot_pick, refine_phrases)
        cuda_pool.refine(keys.cuda(), slot_pick.cuda(), refine_phrases.cuda())
        _compare_pools(cpu_pool, cuda_pool, f"refine M={M}")
    tokens = torch.randint(0, V, (9000,), generator=gen)
    cpu_pool.insert_ngrams(tokens)
    cuda_pool.insert_ngrams(tokens.cuda())
    _compare_pools(cpu_pool, cuda_pool, "insert_ngrams")


@gpu
@needs_cuda_ops
def test_cuda_lookup_into_buffers():
    """lookup(..., out=...) on CUDA: poisoned buffers get exactly the CPU result; buffers
    on the wrong device are rejected."""
    cpu_pool = filled_pool(V=30, W=7, L=3, seed=9)
    cuda_pool = CandidatePool(30, 7, 3, device="cuda")
    cuda_pool.load_state_dict(cpu_pool.state_dict())
    keys = torch.tensor([3, -1, 29, 3, 0, 17] * 50)
    for k in (1, 4, 7, 12):
        out = cuda_pool.empty_lookup(len(keys), k)
        for buffer in out:
            buffer.fill_(0x5A5A5A5A)
        got = cuda_pool.lookup(keys.cuda(), k, out=out)
        assert got is out
        for e, g in zip(cpu_pool.lookup(keys, k), got, strict=True):
            assert g.device.type == "cuda" and torch.equal(g.cpu(), e), k
    with pytest.raises(ValueError, match="^out.phrases"):
        cuda_pool.lookup(keys.cuda(), 4, out=cpu_pool.empty_lookup(len(keys), 4))


@gpu
@needs_cuda_ops
def test_cuda_skips_invalid_entries_and_checks_with_validate():
    """On CUDA an out-of-range value cannot raise without a sync: the entry is skipped
    (like padding). validate=True raises the CPU's ValueError."""
    V, W, L = 6, 3, 2
    cpu_pool, cuda_pool = CandidatePool(V, W, L), CandidatePool(V, W, L, device="cuda")
    keys = torch.tensor([1, 6, -3, 2, 1])
    phrases = torch.tensor([[1, 2], [3, 4], [5, 5], [6, -4], [2, 2]])
    cuda_pool.insert(keys.cuda(), phrases.cuda())
    cpu_pool.insert(torch.tensor([1, -1, -1, -1, 1]), phrases.clamp(min=-1))
    _compare_pools(cpu_pool, cuda_pool, "invalid insert")
    got = cuda_pool.lookup(torch.tensor([1, 9, -5]).cuda(), 2)
    assert got.counts.tolist() == [2, 0, 0]
    cuda_pool.refine(torch.tensor([1, 1]).cuda(), torch.tensor([0, 7]).cuda(),
                     torch.tensor([[8, 8], [9, 9]]).cuda())
    cpu_pool.refine(torch.tensor([1, 1]), torch.tensor([0, -1]), torch.tensor([[8, 8], [9, 9]]))
    _compare_pools(cpu_pool, cuda_pool, "invalid refine")
    with pytest.raises(ValueError, match="^keys"):
        cuda_pool.insert(keys.cuda(), phrases.clamp(min=0).cuda(), validate=True)
    with pytest.raises(ValueError, match="^phrases"):
        cuda_pool.insert(keys.clamp(0, 5).cuda(), phrases.cuda(), validate=True)
    with pytest.raises(ValueError, match="^slots"):
        cuda_pool.refine(torch.tensor([1]).cuda(), torch.tensor([3]).cuda(),
                         torch.tensor([[8, 8]]).cuda(), validate=True)
    with pytest.raises(ValueError, match="^keys"):
        cuda_pool.lookup(torch.tensor([1]), 2)  # CPU keys, CUDA pool


@gpu
@needs_cuda_ops
def test_cuda_registered_ops_and_opcheck():
    """The dispatcher path reaches the CUDA kernels (same results as the CPU op)."""
    ops = torch.ops.ouroboros_kernels
    cpu_pool = filled_pool(V=30, W=5, L=3, seed=4)
    state = {k: v.cuda() for k, v in cpu_pool.state_dict().items()}
    keys = torch.tensor([1, 2, 1, -1, 29])
    rows = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [7, 7, 7], [0, 0, 0]],
                        dtype=torch.int32)
    ops.pool_insert(state["phrases"], state["stamps"], state["clock"], keys.cuda(), rows.cuda())
    cpu_pool.insert(keys, rows)
    for e, g in zip(cpu_pool.lookup(keys, 7),
                    ops.pool_lookup(state["phrases"], state["stamps"], keys.cuda(), 7),
                    strict=True):
        assert torch.equal(g.cpu(), e)
    slots = torch.tensor([0, 1, 2, 3, 4])
    ops.pool_refine(state["phrases"], state["stamps"], keys.cuda(), slots.cuda(), rows.cuda())
    cpu_pool.refine(keys, slots, rows)
    for name, tensor in cpu_pool.state_dict().items():
        assert torch.equal(state[name].cpu(), tensor), name
    torch.library.opcheck(ops.pool_lookup.default,
                          (state["phrases"], state["stamps"], keys.cuda(), 3))
    torch.library.opcheck(ops.pool_insert.default, (state["phrases"], state["stamps"],
                                                    state["clock"], keys.cuda(), rows.cuda()))


@gpu
@needs_cuda_ops
def test_cuda_save_load_and_to(tmp_path):
    pool = filled_pool().to("cuda")
    assert pool.device.type == "cuda"
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    on_cpu = CandidatePool.load(path)
    on_cuda = CandidatePool.load(path, device="cuda")
    for name, tensor in pool.state_dict().items():
        assert torch.equal(on_cpu.state_dict()[name], tensor.cpu())
        assert torch.equal(on_cuda.state_dict()[name], tensor)
    keys = torch.tensor([3, 4, 3])
    phrases = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    on_cpu.insert(keys, phrases)
    on_cuda.insert(keys.cuda(), phrases.cuda())
    _compare_pools(on_cpu, on_cuda, "after load")
    assert on_cuda.to("cpu").device == torch.device("cpu")
