"""A model of the CUDA caching allocator: 512-B block rounding and segment rules for reserved bytes.

Facts modelled (PyTorch's CUDACachingAllocator with default settings):
- every request is rounded up to a multiple of 512 B (at least 512 B; zero-byte tensors take nothing);
- requests <= 1 MiB come from the small pool, carved out of 2 MiB segments;
- larger requests come from the large pool: under 10 MiB from 20 MiB segments, 10 MiB and up
  from a segment of the request rounded up to 2 MiB;
- a free block is found best-fit in its pool; the remainder of a split block stays free when it is
  >= 512 B (small pool) or > 1 MiB (large pool); freed blocks merge with free neighbours;
- segments are kept (reserved) until ``empty_cache``, which the step never calls.
With ``AllocatorSettings`` (``_cuda_facts/allocator_settings.py``): ``max_split_size_mb``,
``max_non_split_rounding_mb`` and ``roundup_power2_divisions`` as CUDACachingAllocator.cpp applies them.
Not modelled (the emulated backend refuses them): expandable segments, the garbage-collection threshold,
cudaMallocAsync; nor streams. Reserved figures are a prediction, allocated ones exact.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .._cuda_facts.allocator_settings import AllocatorSettings

BLOCK = 512
SMALL_REQUEST = 1 << 20          # requests up to this size use the small pool
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
MIN_LARGE_ALLOC = 10 << 20       # requests below this get a 20 MiB segment
ROUND_LARGE = 2 << 20


def round_allocation(nbytes: int) -> int:
    """Bytes the caching allocator hands out for a request of ``nbytes`` (0 stays 0)."""
    if nbytes <= 0:
        return 0
    return max(BLOCK, -(-nbytes // BLOCK) * BLOCK)


def rounding_for(settings: AllocatorSettings | None) -> Callable[[int], int]:
    """The request rounding under ``settings``: ``round_allocation`` itself at the defaults."""
    if settings is None or not any(settings.divisions):
        return round_allocation
    return lambda nbytes: 0 if nbytes <= 0 else settings.round_size(nbytes)


def segment_size(request: int) -> int:
    """Size of the new segment the allocator reserves when no cached block fits ``request``."""
    if request <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if request < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-request // ROUND_LARGE) * ROUND_LARGE


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True


@dataclass
class _Pool:
    """Free blocks of one pool, kept sorted by (size, segment, offset) for best fit."""

    free: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, block: _Block) -> None:
        bisect.insort(self.free, (block.size, block.segment, block.offset))

    def remove(self, block: _Block) -> None:
        i = bisect.bisect_left(self.free, (block.size, block.segment, block.offset))
        del self.free[i]

    def best_fit(self, size: int) -> tuple[int, int, int] | None:
        i = bisect.bisect_left(self.free, (size, -1, -1))
        return self.free[i] if i < len(self.free) else None


class CachingAllocatorModel:
    """Replays allocations and frees (already rounded sizes) and reports reserved bytes."""

    def __init__(self, settings: AllocatorSettings | None = None) -> None:
        settings = settings or AllocatorSettings()
        self._max_split = settings.max_split_size if settings.max_split_size is not None else float("inf")
        self._non_split = settings.max_non_split_rounding
        self.reserved = 0
        self.peak_reserved = 0
        self.allocated = 0
        self._segments: list[dict[int, _Block]] = []   # segment -> offset -> block
        self._segment_pool: list[bool] = []            # True = small pool
        self._pools = {True: _Pool(), False: _Pool()}
        self._owned: dict[int, _Block] = {}            # key -> allocated block

    def malloc(self, key: int, size: int) -> None:
        if size == 0:
            return
        small = size <= SMALL_REQUEST
        pool = self._pools[small]
        found = pool.best_fit(size)
        if found is not None and not small and not self._may_take(size, found[0]):
            found = None  # get_free_block refuses its best fit: a new segment instead
        if found is None:
            seg = len(self._segments)
            seg_size = segment_size(size)
            block = _Block(seg, 0, seg_size)
            self._segments.append({0: block})
            self._segment_pool.append(small)
            self.reserved += seg_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        else:
            _, seg, offset = found
            block = self._segments[seg][offset]
            pool.remove(block)
        remaining = block.size - size
        if remaining >= BLOCK if small else (size < self._max_split and remaining > SMALL_REQUEST):
            rest = _Block(block.segment, block.offset + size, remaining)
            self._segments[block.segment][rest.offset] = rest
            pool.add(rest)
            block.size = size
        block.free = False
        self._owned[key] = block
        self.allocated += block.size

    def _may_take(self, size: int, block_size: int) -> bool:
        """get_free_block with max_split_size: no oversize block for a smaller request, and an oversize
        request wastes less than max_non_split_rounding (always true at the defaults)."""
        if size < self._max_split:
            return block_size < self._max_split
        return block_size < size + self._non_split

    def free(self, key: int) -> None:
        block = self._owned.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        block.free = True
        pool = self._pools[self._segment_pool[block.segment]]
        blocks = self._segments[block.segment]
        # merge with the free neighbour after, then the one before
        after = blocks.get(block.offset + block.size)
        if after is not None and after.free:
            pool.remove(after)
            del blocks[after.offset]
            block.size += after.size
        before = self._find_before(blocks, block.offset)
        if before is not None and before.free:
            pool.remove(before)
            del blocks[block.offset]
            before.size += block.size
            block = before
        pool.add(block)

    @staticmethod
    def _find_before(blocks: dict[int, _Block], offset: int) -> _Block | None:
        for candidate in blocks.values():
            if candidate.offset + candidate.size == offset:
                return candidate
        return None

    def replay(self, events: Iterable[tuple[int, int]]) -> list[int]:
        """Apply (key, +size | -size) events; return the reserved bytes after each one."""
        return [reserved for _, reserved in replay_allocations(events, self)]


def replay_allocations(events: Iterable[tuple[int, int]],
                       model: CachingAllocatorModel | None = None) -> Iterator[tuple[int, int]]:
    """(allocated, reserved) after each (key, +size | -size) event, in order.

    With ``model`` the allocator's whole blocks and segments (a large block is not split when 1 MiB or
    less would remain, so allocated can exceed the sum of the requests); without, the plain running sum
    of the sizes, and reserved equals allocated. The one replay loop of the package (backends, advisor).
    """
    allocated = 0
    for key, delta in events:
        if model is None:
            allocated += delta
            yield allocated, allocated
            continue
        if delta > 0:
            model.malloc(key, delta)
        elif delta < 0:
            model.free(key)
        yield model.allocated, model.reserved
