"""The CUDA caching-allocator model: 512-B rounding, segment sizes, block reuse, splitting and merging."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gpumem._measure.allocator import CachingAllocatorModel, round_allocation, segment_size

KiB, MiB = 2**10, 2**20


@pytest.mark.parametrize(
    ("request_bytes", "rounded"),
    [(0, 0), (-5, 0), (1, 512), (4, 512), (511, 512), (512, 512), (513, 1024), (1000, 1024),
     (MiB, MiB), (MiB + 1, MiB + 512), (10 * MiB - 1, 10 * MiB)],
)
def test_round_allocation(request_bytes, rounded):
    assert round_allocation(request_bytes) == rounded


@given(st.integers(min_value=1, max_value=2**40))
def test_round_allocation_is_the_least_multiple_of_512_at_least_the_request(n):
    r = round_allocation(n)
    assert r % 512 == 0 and n <= r < n + 512


@pytest.mark.parametrize(
    ("request_bytes", "segment"),
    [(512, 2 * MiB), (MiB, 2 * MiB), (MiB + 512, 20 * MiB), (10 * MiB - 512, 20 * MiB),
     (10 * MiB, 10 * MiB), (10 * MiB + 512, 12 * MiB), (100 * MiB, 100 * MiB), (101 * MiB, 102 * MiB)],
)
def test_segment_size(request_bytes, segment):
    assert segment_size(request_bytes) == segment


def test_small_blocks_share_a_two_mib_segment():
    model = CachingAllocatorModel()
    for key in range(4):
        model.malloc(key, 512 * KiB)
    assert model.reserved == 2 * MiB
    model.malloc(4, 512)  # the segment is full: a second one
    assert model.reserved == 4 * MiB
    assert model.allocated == 2 * MiB + 512


def test_freed_block_is_reused_not_reserved_again():
    model = CachingAllocatorModel()
    model.malloc(0, 4 * MiB)
    assert model.reserved == 20 * MiB
    model.free(0)
    assert model.allocated == 0 and model.reserved == 20 * MiB  # cached, not returned
    model.malloc(1, 4 * MiB)
    model.malloc(2, 4 * MiB)
    assert model.reserved == 20 * MiB


def test_large_request_gets_its_own_rounded_segment():
    model = CachingAllocatorModel()
    model.malloc(0, 11 * MiB + 512)
    assert model.reserved == 12 * MiB
    model.malloc(1, 512)  # small requests never come from the large pool
    assert model.reserved == 14 * MiB


def test_large_pool_remainder_up_to_one_mib_is_not_split_off():
    model = CachingAllocatorModel()
    model.malloc(0, 19 * MiB + 512)  # a 20 MiB segment; remainder 1 MiB - 512: stays with the block
    assert model.allocated == 20 * MiB
    model.free(0)
    model.malloc(1, 2 * MiB)  # 18 MiB remain: split off and usable
    model.malloc(2, 18 * MiB)
    assert model.reserved == 20 * MiB


def test_neighbouring_free_blocks_merge():
    model = CachingAllocatorModel()
    for key in range(4):
        model.malloc(key, 512 * KiB)
    for key in (1, 0, 3, 2):  # frees in an order that needs merging both ways
        model.free(key)
    model.malloc(9, 2 * MiB)  # > 1 MiB: large pool, so it cannot use the small segment...
    assert model.reserved == 2 * MiB + 20 * MiB
    model.malloc(10, MiB)  # ...but a full 1 MiB small request fits the merged small segment
    model.malloc(11, MiB)
    assert model.reserved == 22 * MiB


def test_peak_reserved_and_replay_history():
    model = CachingAllocatorModel()
    history = model.replay([(0, 512), (1, 3 * MiB), (0, -512), (2, 512), (1, -3 * MiB)])
    assert history == [2 * MiB, 22 * MiB, 22 * MiB, 22 * MiB, 22 * MiB]
    assert model.peak_reserved == 22 * MiB
    assert model.allocated == 512


def test_unknown_free_is_ignored():
    model = CachingAllocatorModel()
    model.free(42)
    assert model.allocated == model.reserved == 0


def _check_invariants(model: CachingAllocatorModel) -> None:
    assert model.allocated == sum(b.size for b in model._owned.values())
    total = 0
    free_listed = set()
    for pool in model._pools.values():
        free_listed |= {(seg, off) for _, seg, off in pool.free}
    for seg, blocks in enumerate(model._segments):
        ordered = sorted(blocks.values(), key=lambda b: b.offset)
        offset = 0
        for prev, block in zip([None, *ordered], ordered):
            assert block.offset == offset, "blocks tile the segment without gaps or overlap"
            offset += block.size
            assert block.free == ((seg, block.offset) in free_listed)
            if prev is not None:
                assert not (prev.free and block.free), "free neighbours are merged"
        total += offset
    assert total == model.reserved
    assert model.reserved <= model.peak_reserved


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("malloc"), st.integers(min_value=1, max_value=24 * MiB).map(round_allocation)),
            st.tuples(st.just("free"), st.integers(min_value=0, max_value=40)),
        ),
        max_size=40,
    )
)
def test_invariants_hold_under_any_sequence(ops):
    model = CachingAllocatorModel()
    live: list[int] = []
    reserved_so_far = 0
    for key, (op, arg) in enumerate(ops):
        if op == "malloc":
            model.malloc(key, arg)
            live.append(key)
        elif live:
            model.free(live.pop(arg % len(live)))
        assert model.reserved >= reserved_so_far, "segments are never released during a step"
        reserved_so_far = model.reserved
        assert model.reserved >= model.allocated
        _check_invariants(model)
    for key in live:
        model.free(key)
    assert model.allocated == 0
    for blocks in model._segments:
        assert len(blocks) == 1, "with everything freed each segment is one free block"


def test_replay_allocations_with_and_without_the_allocator_model():
    from pytest_gpumem._measure.allocator import replay_allocations

    events = [(0, 512), (1, 2 * MiB), (0, -512), (1, -2 * MiB)]
    # plain running sum: 512; 512 + 2 MiB; 2 MiB; 0 -- reserved is the same figure
    assert list(replay_allocations(events)) == [(512, 512), (512 + 2 * MiB, 512 + 2 * MiB), (2 * MiB, 2 * MiB),
                                                (0, 0)]
    # the model: 512 B carves a 2 MiB small segment; 2 MiB (> 1 MiB) takes a 20 MiB large segment and, with
    # 18 MiB left over (> 1 MiB), is split to exactly 2 MiB; segments stay reserved after the frees
    assert list(replay_allocations(events, CachingAllocatorModel())) == [
        (512, 2 * MiB), (512 + 2 * MiB, 22 * MiB), (2 * MiB, 22 * MiB), (0, 22 * MiB)]
