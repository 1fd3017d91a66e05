"""PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF: parsed as torch parses them, modelled where exact, refused elsewhere.

Expected figures follow c10/cuda/CUDACachingAllocator.cpp (round_size, roundup_power2_next_division,
get_free_block, should_split) with the arithmetic in comments.
"""
from __future__ import annotations

import pytest
import torch

from pytest_gpumem import measure_step
from pytest_gpumem._cuda_facts.allocator_settings import (
    AllocatorSettings, UnsupportedAllocatorSettings, from_environment, next_division, parse)
from pytest_gpumem._measure.allocator import CachingAllocatorModel, rounding_for

KiB, MiB = 2**10, 2**20


@pytest.mark.parametrize(("size", "divisions", "rounded"), [
    (1200, 4, 1280),                 # 1024 + 1024/4: torch's own example
    (1_200_000, 4, 1_310_720),       # steps of 2^20 / 4 = 262,144 above 2^20: 2^20 + 262,144
    (3 * MiB, 2, 3 * MiB),           # 2 MiB + 1 MiB is a step already
    (3 * MiB + 1, 2, 4 * MiB),       # the next step of 1 MiB above 3 MiB
    (4 * MiB, 8, 4 * MiB),           # a power of two stays
])
def test_next_division(size, divisions, rounded):
    assert next_division(size, divisions) == rounded


def test_round_size_uses_divisions_only_above_512_bytes_times_divisions():
    settings = parse("roundup_power2_divisions:4")
    assert settings.round_size(100) == 512                # below a block: one block
    assert settings.round_size(1200) == 1536              # 1200 < 512 x 4 = 2048: 512-B multiples (3 x 512)
    assert settings.round_size(3000) == 3072              # 3000 > 2048: steps of 2048/4 = 512 above 2048 -> 3072
    assert settings.round_size(1_200_000) == 1_310_720    # as next_division above
    assert rounding_for(settings)(0) == 0 and rounding_for(AllocatorSettings())(1200) == 1536


def test_interval_table_keys_are_mib_powers_of_two():
    settings = parse("roundup_power2_divisions:[256:1,512:2,>:4]")
    # the first key fills every interval below it: 1 MiB .. 256 MiB take 1 (no rounding)
    assert settings.divisions_for(5 * MiB) == 1 and settings.divisions_for(300 * MiB) == 1
    # '>' fills from the last key's own interval on (AllocatorConfig.cpp's std::fill starts at last_index), so
    # [512 MiB, 1 GiB) ends with 4, not the 2 its key gave
    assert settings.divisions_for(600 * MiB) == 4
    assert settings.divisions_for(3 << 30) == 4
    assert settings.round_size(600 * MiB) == 640 * MiB     # 512 MiB + one step of 512/4 = 128 MiB


def test_max_split_size_keeps_oversize_blocks_whole_and_away_from_small_requests():
    settings = parse("max_split_size_mb:64")
    model = CachingAllocatorModel(settings)
    model.malloc(0, 100 * MiB)          # its own 100 MiB segment
    model.free(0)
    model.malloc(1, 30 * MiB)           # 30 MiB < 64 MiB may not take the 100 MiB >= 64 MiB block: a new 30 MiB segment
    assert model.reserved == 130 * MiB and model.allocated == 30 * MiB
    model.malloc(2, 90 * MiB)           # 90 >= 64 takes the cached 100 MiB block (waste 10 MiB < 20 MiB), unsplit
    assert model.allocated == 30 * MiB + 100 * MiB and model.reserved == 130 * MiB
    default = CachingAllocatorModel()
    default.malloc(0, 100 * MiB)
    default.free(0)
    default.malloc(1, 30 * MiB)         # at the defaults the 100 MiB block is split: 30 used, 70 stay free
    assert default.reserved == 100 * MiB and default.allocated == 30 * MiB


def test_an_oversize_request_refuses_a_block_wasting_the_non_split_rounding():
    model = CachingAllocatorModel(parse("max_split_size_mb:64"))
    model.malloc(0, 120 * MiB)
    model.free(0)
    model.malloc(1, 80 * MiB)           # 120 >= 80 + 20: refused, a new 80 MiB segment
    assert model.reserved == 200 * MiB
    relaxed = CachingAllocatorModel(parse("max_split_size_mb:64,max_non_split_rounding_mb:64"))
    relaxed.malloc(0, 120 * MiB)
    relaxed.free(0)
    relaxed.malloc(1, 80 * MiB)         # 120 < 80 + 64: taken whole
    assert relaxed.reserved == 120 * MiB and relaxed.allocated == 120 * MiB


@pytest.mark.parametrize("text", ["expandable_segments:True", "backend:cudaMallocAsync",
                                  "garbage_collection_threshold:0.6", "max_split_size_mb:128,expandable_segments:True"])
def test_settings_not_modelled_are_refused_naming_the_setting_and_the_way_out(text):
    with pytest.raises(UnsupportedAllocatorSettings) as info:
        parse(text)
    key = text.split(",")[-1].split(":")[0]
    assert key in str(info.value) and "cuda backend" in str(info.value) and "unset it" in str(info.value)


def test_bad_values_are_refused_as_torch_refuses_them():
    with pytest.raises(UnsupportedAllocatorSettings, match="must be >= 20"):
        parse("max_split_size_mb:8")
    with pytest.raises(UnsupportedAllocatorSettings, match="power of 2"):
        parse("roundup_power2_divisions:3")


def test_environment_variables_and_their_conflict():
    assert from_environment({}).is_default
    assert from_environment({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}).max_split_size == 64 * MiB
    assert from_environment({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False,pinned_num_register_threads:8"}).is_default
    with pytest.raises(UnsupportedAllocatorSettings, match="set only one"):
        from_environment({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:32"})


def _step(backend="emulated"):
    model = torch.nn.Linear(1000, 1000)  # weight 4,000,000 B: its grad and weight are 4,000,000-B requests
    return measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 1000), backend=backend)


def test_the_emulated_backend_rounds_with_the_divisions(monkeypatch):
    plain = _step()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "roundup_power2_divisions:4")
    rounded = _step()
    # the weight (4,000,000 B) rounds to 4,000,256 B (512-B multiple) by default, to 4,194,304 B with 4 divisions
    # (steps of 2^21 / 4 = 524,288 above 2^21: 2^21 + 4 x 524,288 = 2^22): 194,048 B more per weight-sized block
    assert rounded.phases[plain.peak_phase].peak > plain.phases[plain.peak_phase].peak
    assert any("allocator settings modelled: PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions:4" in n for n in rounded.notes)
    setup = rounded.steps[0].phases
    from pytest_gpumem import Phase
    assert setup[Phase.SETUP].peak - plain.steps[0].phases[Phase.SETUP].peak == 4_194_304 - 4_000_256


def test_the_emulated_backend_refuses_expandable_segments(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(UnsupportedAllocatorSettings, match="expandable_segments:True"):
        _step()
    assert _step("cpu").peak > 0  # the cpu backend has no CUDA allocator to model: it runs
