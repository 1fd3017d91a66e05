"""``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF``: which caching-allocator settings the emulation models.

Source: ``c10/core/AllocatorConfig.cpp`` (parsing; the 16 power-of-two intervals from 1 MiB to 64 GiB) and
``c10/cuda/CUDACachingAllocator.cpp`` (``round_size``, ``roundup_power2_next_division``, ``get_free_block``,
``should_split``), read on pytorch main in 2026; the key names are strings in the 2.11.0 and 2.14.1 wheels'
``libc10.so`` / ``libc10_cuda.so``. Releases differ in which variable wins when both are set (one reads
``PYTORCH_ALLOC_CONF`` first, another ``PYTORCH_CUDA_ALLOC_CONF``), so two different values are refused.
- ``max_split_size_mb`` (>= 20): blocks of at least this size are never split, a smaller request never takes
  one, and a request of at least this size takes a cached block only if it wastes less than
  ``max_non_split_rounding_mb`` (default 20 MiB).
- ``roundup_power2_divisions``: a request above ``512 B x divisions`` is rounded up to the next of
  ``divisions`` equal steps between two powers of two (1,200,000 B with 4: steps of 2^20 / 4 = 262,144 B
  above 2^20, so 1,310,720 B); per size interval with ``[256:1,512:2,>:4]`` (interval keys in MiB).
Modelled: those three, ``expandable_segments:False``, ``backend:native``. Without effect on allocated or
reserved bytes: the ``pinned_*`` host-memory keys, ``release_lock_on_cudamalloc``,
``graph_capture_record_stream_reuse``. Refused: everything else (``expandable_segments:True``, the
cudaMallocAsync backend, ``garbage_collection_threshold``, ``per_process_memory_fraction``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

MB = 1 << 20
MIN_BLOCK = 512
LARGE_BUFFER = 20 * MB                 #: kLargeBuffer: the smallest max_split_size_mb, the default non-split rounding
INTERVALS = 16                         #: kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB
_FIRST_INTERVAL_LOG2 = 20              #: log2(1 MiB)
VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
HARMLESS = frozenset({"pinned_use_cuda_host_register", "pinned_num_register_threads", "pinned_use_background_threads",
                      "pinned_reserve_segment_size_mb", "release_lock_on_cudamalloc",
                      "graph_capture_record_stream_reuse"})
_TOKEN = re.compile(r"[,:\[\]]|[^,:\[\]\s]+")


class UnsupportedAllocatorSettings(ValueError):
    """Allocator settings the emulation does not model: it refuses to predict under them."""


@dataclass(frozen=True)
class AllocatorSettings:
    """The caching allocator's tunables that change allocated or reserved bytes (defaults: none set)."""

    max_split_size: int | None = None          #: bytes; None = unlimited (the default)
    max_non_split_rounding: int = LARGE_BUFFER
    divisions: tuple[int, ...] = field(default=(0,) * INTERVALS)
    source: str = ""                           #: "PYTORCH_ALLOC_CONF=..." when read from the environment

    @property
    def is_default(self) -> bool:
        return self.max_split_size is None and self.max_non_split_rounding == LARGE_BUFFER and not any(self.divisions)

    def divisions_for(self, size: int) -> int:
        """AllocatorConfig::roundup_power2_divisions: the interval of ``size`` (below 1 MiB: the first)."""
        index = size.bit_length() - 1 - _FIRST_INTERVAL_LOG2
        return self.divisions[min(max(index, 0), INTERVALS - 1)]

    def round_size(self, size: int) -> int:
        """round_size: at least 512 B; power-of-two divisions above 512 B x divisions; else 512-B multiples."""
        if size < MIN_BLOCK:
            return MIN_BLOCK
        divisions = self.divisions_for(size)
        if divisions > 1 and size > MIN_BLOCK * divisions:
            return next_division(size, divisions)
        return -(-size // MIN_BLOCK) * MIN_BLOCK


def next_division(size: int, divisions: int) -> int:
    """roundup_power2_next_division: the next of ``divisions`` equal steps between two powers of two."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    below = size & ~(step - 1)
    return size if below == size else below + step


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _divisions(tokens: list[str], where: str) -> tuple[int, ...]:
    if tokens and tokens[0] != "[":
        value = int(tokens[0])
        if not _power_of_two(value):
            raise UnsupportedAllocatorSettings(f"{where}: roundup_power2_divisions must be a power of 2, got {value}")
        return (value,) * INTERVALS
    table = [0] * INTERVALS
    first, last = True, 0
    pairs = [t for t in tokens[1:] if t not in (",", "]")]
    for key, colon, value in zip(pairs[0::3], pairs[1::3], pairs[2::3]):
        divisions = int(value)
        if divisions and not _power_of_two(divisions):
            raise UnsupportedAllocatorSettings(f"{where}: roundup_power2_divisions values must be 0 or a power of 2")
        if key == ">":
            table[last:] = [divisions] * (INTERVALS - last)
            continue
        mb = int(key)
        if not _power_of_two(mb):
            raise UnsupportedAllocatorSettings(f"{where}: roundup_power2_divisions intervals must be powers of 2 (MiB)")
        index = min(mb.bit_length() - 1, INTERVALS - 1)
        if first:
            table[:index] = [divisions] * index
            first = False
        table[index], last = divisions, index
    return tuple(table)


def _entries(text: str) -> list[tuple[str, list[str]]]:
    """``key:value`` entries of a setting string (a bracketed list stays one value)."""
    tokens, entries, depth, current = _TOKEN.findall(text), [], 0, []
    for token in tokens + [","]:
        depth += token == "["
        depth -= token == "]"
        if token == "," and depth == 0:
            if current:
                entries.append((current[0], [t for t in current[2:]]))
            current = []
        else:
            current.append(token)
    return entries


def parse(text: str, where: str = "PYTORCH_CUDA_ALLOC_CONF") -> AllocatorSettings:
    """The modelled settings in ``text``; UnsupportedAllocatorSettings naming any setting that is not."""
    max_split, non_split, divisions = None, LARGE_BUFFER, (0,) * INTERVALS
    for key, value in _entries(text):
        plain = "".join(value)
        if key == "max_split_size_mb":
            mb = int(plain)
            if mb < LARGE_BUFFER // MB:
                raise UnsupportedAllocatorSettings(f"{where}: max_split_size_mb must be >= 20 (torch refuses {mb})")
            max_split = mb * MB
        elif key == "max_non_split_rounding_mb":
            non_split = max(int(plain), LARGE_BUFFER // MB) * MB
        elif key == "roundup_power2_divisions":
            divisions = _divisions(value, where)
        elif (key, plain) in (("expandable_segments", "False"), ("backend", "native")) or key in HARMLESS:
            continue
        else:
            raise UnsupportedAllocatorSettings(
                f"{where} sets {key}:{plain}, which the emulated backend does not model (it changes allocated or "
                "reserved bytes in ways not reproduced on meta tensors); unset it for the emulated run, or measure "
                "on the cuda backend. Modelled: max_split_size_mb, max_non_split_rounding_mb, "
                "roundup_power2_divisions, expandable_segments:False, backend:native")
    return AllocatorSettings(max_split, non_split, divisions, f"{where}={text}")


def from_environment(env: Mapping[str, str] | None = None) -> AllocatorSettings:
    """The settings a CUDA process started with ``env`` (default: os.environ) would use."""
    env = os.environ if env is None else env
    given = {name: env[name] for name in VARIABLES if env.get(name, "").strip()}
    if not given:
        return AllocatorSettings()
    if len(set(given.values())) > 1:
        raise UnsupportedAllocatorSettings(
            "PYTORCH_ALLOC_CONF and PYTORCH_CUDA_ALLOC_CONF are both set, to different values, and torch releases "
            "differ in which one wins; set only one")
    name, text = next(iter(given.items()))
    return parse(text, name)
