"""Target GPUs: the profiles, the library workspaces the emulation adds for them, budgets as a share of memory.

Workspace sizes come from CublasHandlePool.cpp (see _cuda_facts/workspaces.py); figures below state them
with their arithmetic. No figure here was measured on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem import Category, measure_step
from pytest_gpumem._core.budget import Budget, BudgetError, budget_from_marker, budget_from_total
from pytest_gpumem._cuda_facts import devices, workspaces
from pytest_gpumem._cuda_facts.devices import DeviceProfile, UnknownDevice
from pytest_gpumem._emulation.devices import known_profiles, resolve
from pytest_gpumem._emulation.library_allocations import NOTE_CONVOLUTION, NOTE_NO_DEVICE
from pytest_gpumem._measure.backends import make_backend

KiB, MiB, GiB = 2**10, 2**20, 2**30
HOPPER = 32 * MiB                     # 4096 * 8 * 1024
OLDER = 2 * 4096 * KiB + 8 * 16 * KiB  # ':4096:2:16:8' = 8,519,680 B
LT = 1024 * KiB                       # CUBLASLT_WORKSPACE_SIZE's default, in KiB


def test_every_profile_the_issue_names_is_there_with_its_capability():
    sm = {p.name: p.sm for p in devices.BUILTIN}
    assert sm == {"H100-SXM": (9, 0), "H100-PCIe": (9, 0), "H200": (9, 0), "A100-40GB": (8, 0), "A100-80GB": (8, 0),
                  "L4": (8, 9), "A10G": (8, 6), "L40S": (8, 9), "V100-16GB": (7, 0), "V100-32GB": (7, 0),
                  "RTX-4090": (8, 9)}
    assert resolve("h100").name == resolve("H100 SXM").name == "H100-SXM"   # case, spaces and dashes ignored
    assert resolve("a100").name == "A100-80GB"
    assert resolve("A100-40GB").total_memory == 42_298_834_944               # a driver figure, cited in the module
    assert resolve("H200").total_memory == 141 * GiB and resolve("H200").memory_source == "nominal"


def test_an_unknown_device_lists_the_known_ones():
    with pytest.raises(UnknownDevice) as info:
        resolve("H300")
    assert "'H300'" in str(info.value)
    assert all(p.name in str(info.value) for p in devices.BUILTIN)


@pytest.mark.parametrize(("name", "cublas"), [("H100", HOPPER), ("H200", HOPPER), ("A100", OLDER), ("L4", OLDER),
                                              ("V100", OLDER), ("RTX-4090", OLDER)])
def test_cublas_workspace_by_architecture(name, cublas):
    profile = resolve(name)
    assert profile.cublas_workspace({}) == cublas and profile.cublaslt_workspace({}) == LT


def test_workspace_environment_variables():
    h100 = resolve("H100")
    assert h100.cublas_workspace({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == 8 * 4096 * KiB      # 32 MiB
    assert h100.cublas_workspace({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 8 * 16 * KiB          # 128 KiB
    assert h100.cublas_workspace({"CUBLAS_WORKSPACE_CONFIG": "garbage"}) == HOPPER              # torch warns, keeps it
    # cuBLASLt is capped at the cuBLAS size: 1 MiB > 128 KiB
    assert h100.cublaslt_workspace({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 128 * KiB
    assert h100.cublaslt_workspace({"CUBLASLT_WORKSPACE_SIZE": "4096"}) == 4 * MiB
    assert h100.cublaslt_workspace({"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "1"}) == 0
    blackwell = DeviceProfile("B200", (10, 0), 180 * GiB, "nominal")
    with pytest.raises(UnknownDevice, match="changed between releases"):
        blackwell.cublas_workspace({})
    assert DeviceProfile("B200", (10, 0), 180 * GiB, "nominal", cublas_workspace_override=HOPPER).cublas_workspace({}) == HOPPER


def test_cublaslt_path_conditions():
    ok = dict(bias_contiguous=True, beta=1.0, dtype_ok=True, env={})
    assert workspaces.takes_cublaslt("addmm", (64,), mat1_shape=(32, 128), mat2_shape=(128, 64), **ok)
    assert not workspaces.takes_cublaslt("mm", (64,), mat1_shape=(32, 128), mat2_shape=(128, 64), **ok)
    assert not workspaces.takes_cublaslt("addmm", (32, 64), mat1_shape=(32, 128), mat2_shape=(128, 64), **ok)
    assert not workspaces.takes_cublaslt("addmm", (64,), mat1_shape=(1, 128), mat2_shape=(128, 64), **ok)
    assert not workspaces.takes_cublaslt("addmm", (64,), mat1_shape=(32, 128), mat2_shape=(128, 64),
                                         bias_contiguous=True, beta=1.0, dtype_ok=True, env={"DISABLE_ADDMM_CUDA_LT": "1"})


def _mlp_step(device=None, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10, bias=False))
    return measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(32, 64),
                        target=torch.randint(0, 10, (32,)), loss_fn=nn.functional.cross_entropy,
                        backend=make_backend("emulated", device=device), **kwargs)


def test_workspaces_per_thread_are_named_parts_of_other():
    plain, h100, a100 = _mlp_step(), _mlp_step("H100"), _mlp_step("A100")
    assert NOTE_NO_DEVICE in plain.notes and plain.other_parts == {}
    # forward: the first Linear's addmm takes cuBLASLt (1-D bias) -> cuBLAS and cuBLASLt workspaces on the main thread;
    # backward: mm on autograd's thread -> one more cuBLAS workspace. 32 + 1 + 32 MiB on sm90, 8.125 + 1 + 8.125 before
    assert h100.other_parts == {"cuBLAS workspace (main thread)": HOPPER, "cuBLASLt workspace (main thread)": LT,
                                "cuBLAS workspace (autograd thread)": HOPPER}
    assert h100.peak - plain.peak == 2 * HOPPER + LT == 68_157_440
    assert a100.peak - plain.peak == 2 * OLDER + LT == 18_087_936
    assert "H100-SXM" in h100.device and "cuBLAS workspace (main thread) 32.00 MiB" in h100.table()
    # they are allocated once: the steady step holds them from the start of its forward
    steady = h100.steps[1].phases
    assert all(stats.other_parts == h100.other_parts for stats in steady.values())
    assert h100.to_dict()["other_parts"] == h100.other_parts


def test_workspace_allocations_come_after_the_matmul_output():
    """On CUDA the op's output is allocated before the handle's workspace; the forward phase's peak includes both."""
    plain, h100 = _mlp_step(), _mlp_step("H100")
    from pytest_gpumem import Phase

    first = (plain.steps[0].phases[Phase.FORWARD], h100.steps[0].phases[Phase.FORWARD])
    assert first[1].peak - first[0].peak == HOPPER + LT   # the autograd thread's workspace comes in backward


def test_a_convolution_says_its_workspace_is_not_included():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 3, 8, 8),
                          backend=make_backend("emulated", device="L4"))
    assert NOTE_CONVOLUTION in report.notes


class _SelfAttention(nn.Module):
    """One projection as q, k and v of a 4-head bf16-friendly SDPA over (batch 2, length L, width 64)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64, bias=False)

    def forward(self, x):
        q = self.proj(x).view(x.shape[0], x.shape[1], 4, 16).transpose(1, 2)
        return nn.functional.scaled_dot_product_attention(q, q, q).sum()


def test_attention_kernel_follows_the_device():
    """V100 (sm70) has no flash or cuDNN attention: bf16 SDPA falls to memory-efficient attention there."""
    def run(device):
        model = _SelfAttention()
        return measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 16, 64),
                            loss_fn=lambda out, _: out, backend=make_backend("emulated", device=device),
                            autocast_dtype=torch.bfloat16)

    assert any("cuDNN attention" in n for n in run("H100").notes)
    v100 = run("V100").notes
    assert any("memory-efficient attention" in n and "sm70 outside sm80..sm121" in n for n in v100)


def test_budget_as_a_share_of_the_device_memory():
    budget = budget_from_marker(("90%",), {"device": "H100"})
    assert budget.total is None and budget.share == 0.9 and budget.device == "H100"
    resolved = budget.with_device_total("H100-SXM", 80 * GiB)
    assert resolved.total == int(0.9 * 80 * GiB) == 77_309_411_328
    with pytest.raises(BudgetError, match="no GPU is known"):
        budget.with_device_total(None, None)
    assert budget_from_total("50%").share == 0.5 and budget_from_total("2GiB").total == 2 * GiB
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(BudgetError, match="share of the GPU's memory"):
            budget_from_marker((bad,), {})
    with pytest.raises(BudgetError, match="device="):
        budget_from_marker(("1GB",), {"device": ""})
    assert Budget(share=0.5).is_empty is False


class _Extra:
    @staticmethod
    def pytest_gpumem_device_profiles():
        return [DeviceProfile("T4", (7, 5), 16 * GiB, "nominal", ("Tesla-T4",))]


def test_profiles_can_be_added_through_the_hook():
    from pytest_gpumem._estimate.plugins import plugin_manager

    plugin_manager.register(_Extra)
    try:
        assert resolve("tesla t4").name == "T4" and resolve("T4").cublas_workspace({}) == OLDER
        assert [p.name for p in known_profiles()][-1] == "T4"
    finally:
        plugin_manager.unregister(_Extra)
    with pytest.raises(UnknownDevice):
        resolve("T4")


class ScratchThenLinear(nn.Module):
    """20 MiB made and dropped in forward before a small Linear: without workspaces the peak is in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        scratch = torch.zeros(5 * 2**20, device=x.device)   # 5 Mi fp32 = 20 MiB
        return self.fc(x) + scratch[:1]


def test_a_workspace_that_moves_the_peak_does_not_fake_a_contradiction():
    """One step on an H100: forward holds 20 MiB + 33 MiB of main-thread workspaces, backward ~37 KiB of tensors +
    65 MiB, so the peak moves to backward, where almost nothing of the step's own is alive. The estimate check
    compares with the tracked bytes at the peak the step would have without the workspaces (its forward)."""
    from pytest_gpumem import Phase, compare, estimate_step

    def run(device):
        torch.manual_seed(0)
        model = ScratchThenLinear()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 64)
        return (measure_step(model, opt, x, steps=1, backend=make_backend("emulated", device=device)),
                estimate_step(model, opt, x, steps=1, device="cuda"))

    (plain, estimate), (h100, _) = run(None), run("H100")
    assert plain.peak_phase is Phase.FORWARD and h100.peak_phase is Phase.BACKWARD
    assert h100.peak == plain.steps[0].phases[Phase.BACKWARD].peak + 2 * HOPPER + LT
    assert h100.tracked_peak() == plain.tracked_peak() >= 20 * MiB
    assert compare(h100, estimate).ok and compare(plain, estimate).ok


def test_on_the_cuda_backend_the_gpu_present_wins_with_a_warning(monkeypatch):
    """No GPU here: the GPU 'present' is a stand-in profile (nominal 80 GiB), to check the choice, not a figure."""
    from pytest_gpumem._emulation import devices as choice

    present = devices.from_properties("NVIDIA A100-SXM4-80GB", 8, 0, 80 * GiB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(choice, "present_gpu", lambda index: present)
    with pytest.warns(choice.DeviceMismatchWarning, match="measuring on the GPU present, NVIDIA A100-SXM4-80GB"):
        budget, device = choice.device_for_test(Budget(share=0.5, device="H100"), "cuda", None)
    assert device is present and budget.total == 40 * GiB          # half of the GPU present, not of the H100
    budget, device = choice.device_for_test(Budget(share=0.5), "auto", "A100-80GB")   # the same GPU: no warning
    assert device is present and choice.same_gpu(resolve("A100-80GB"), present)


def test_the_estimate_chooses_attention_kernels_for_the_named_gpu():
    """The fixture runs the estimate inside target_gpu(...): on a V100 (no flash/cuDNN attention) both sides save
    what memory-efficient attention saves."""
    from pytest_gpumem import compare, estimate_step
    from pytest_gpumem._emulation.attention import target_gpu

    torch.manual_seed(0)
    model, x = _SelfAttention(), torch.randn(2, 200, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = dict(loss_fn=lambda out, _: out, autocast_dtype=torch.bfloat16)
    measured = measure_step(model, opt, x, backend=make_backend("emulated", device="V100"), **kwargs)
    with target_gpu(resolve("V100")):
        on_v100 = estimate_step(model, opt, x, device="cuda", **kwargs)
    on_h100 = estimate_step(model, opt, x, device="cuda", **kwargs)
    saved = measured.category_peak(Category.ACTIVATIONS)
    assert on_v100.category_peak(Category.ACTIVATIONS) == saved
    assert any("memory-efficient attention" in n for n in measured.notes)
    # cuDNN attention on an H100 saves a (B, H, L, 1) fp32 softmax stat where the memory-efficient kernel keeps a
    # logsumexp padded to 32 rows, (B, H, round32(L)): 2 x 4 x (224 - 200) x 4 B = 768 B more on the V100
    assert on_h100.category_peak(Category.ACTIVATIONS) == saved - 2 * 4 * (224 - 200) * 4


def test_the_batch_size_advisor_counts_the_named_gpus_workspaces():
    """Every probe on an A100 holds 8,519,680 x 2 + 1,048,576 B of workspaces: a fixed cost the fitted line
    carries, so the same budget fits fewer samples."""
    from pytest_gpumem import advise_batch_size

    def build():
        return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))

    args = (build, lambda p: torch.optim.SGD(p, lr=0.1), lambda b: (torch.randn(b, 256), torch.randint(0, 10, (b,))))
    plain = advise_batch_size(*args, budget="40MiB", safety=1.0, backend="emulated")
    a100 = advise_batch_size(*args, budget="40MiB", safety=1.0, backend="emulated", device="A100")
    assert a100.fixed_bytes - plain.fixed_bytes == 2 * OLDER + LT == 18_087_936
    assert a100.max_batch < plain.max_batch


def test_a_backward_run_twice_in_a_step_keeps_the_workspaces_and_the_peak_without_them():
    """Gradient accumulation: the phase's two runs are merged; the named parts and the workspace-free peak the
    estimate check compares with must come through the merge (they were dropped before)."""
    from pytest_gpumem import Phase, track

    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 8)).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    big, small = torch.randn(256, 64, device="meta"), torch.randn(4, 64, device="meta")
    with track(model, optimizer, backend=make_backend("emulated", device="H100")) as handle:
        model(big).sum().backward()
        model(small).sum().backward()
        optimizer.step()
    backward = handle.report.steps[0].phases[Phase.BACKWARD]
    # both workspaces of the main thread come from forward's addmm (1-D bias: cuBLASLt), autograd's thread's cuBLAS
    # from backward's mm; all three are live at backward's peak
    assert backward.other_parts == {"cuBLAS workspace (main thread)": HOPPER, "cuBLASLt workspace (main thread)": LT,
                                    "cuBLAS workspace (autograd thread)": HOPPER}
    assert backward.without_libraries is not None
    bare_peak, _ = backward.without_libraries
    # the big batch's backward peaks after autograd's thread took its workspace: all three (68,157,440 B) on top
    assert backward.peak - bare_peak == 2 * HOPPER + LT == 68_157_440


def test_phase_parts_round_trip_json_and_older_files_naming_other_parts_apart_still_load():
    from pytest_gpumem._core.results import PhaseStats

    stats = _mlp_step("H100").phases[_mlp_step("H100").peak_phase]
    again = PhaseStats.from_dict(stats.to_dict())
    assert again.peak_parts == stats.peak_parts and again.other_parts == stats.other_parts
    assert all(name.startswith("other: ") for name in stats.to_dict()["peak_parts"])
    older = {**stats.to_dict(), "other_parts": {"cuBLAS workspace (main thread)": HOPPER}}
    del older["peak_parts"]
    assert PhaseStats.from_dict(older).peak_parts == {"other: cuBLAS workspace (main thread)": HOPPER}
