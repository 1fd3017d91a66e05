"""The GPUs the emulated backend can predict for: compute capability, memory, library workspaces, attention.

Compute capabilities: NVIDIA's CUDA GPU list (developer.nvidia.com/cuda-gpus). Memory: where a driver
figure (``cudaDeviceProp.totalGlobalMem``, what ``torch.cuda.get_device_properties().total_memory`` reads)
was found in public material it is used and cited; elsewhere the datasheet's capacity read in GiB, marked
``memory_source="nominal"`` (drivers report a little less: the A100 40GB's 42,298,834,944 B is 98.5% of
40 GiB). Workspace sizes come from ``workspaces.py``; the attention preference from ``attention.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from . import attention, workspaces

GIB = 1 << 30


class UnknownDevice(ValueError):
    """A device name that no profile answers to."""


@dataclass(frozen=True)
class DeviceProfile:
    """One target GPU: what the emulation needs to predict ``torch.cuda.max_memory_allocated`` on it."""

    name: str                              #: canonical name, e.g. "H100-SXM"
    sm: tuple[int, int]                    #: compute capability
    total_memory: int                      #: bytes the driver reports (or the nominal capacity, see below)
    memory_source: str                     #: "driver: <where it was read>" or "nominal"
    aliases: tuple[str, ...] = ()          #: other names it answers to (matched case- and dash-blind)
    description: str = ""
    #: bytes of the cuBLAS workspace per (handle, stream); None: the default for ``sm`` (and the env)
    cublas_workspace_override: int | None = field(default=None, compare=False)

    def cublas_workspace(self, env: Mapping[str, str] | None = None) -> int:
        """Bytes torch's cuBLAS workspace takes per thread that runs matmuls, under ``env`` (default: os.environ)."""
        env = os.environ if env is None else env
        if self.cublas_workspace_override is not None and "CUBLAS_WORKSPACE_CONFIG" not in env:
            return self.cublas_workspace_override
        size = workspaces.cublas_workspace(self.sm, env)
        if size is None:
            raise UnknownDevice(
                f"{self.name}: torch's default cuBLAS workspace on sm{self.sm[0]}{self.sm[1]} changed between releases; "
                "give the profile cublas_workspace_override= or set CUBLAS_WORKSPACE_CONFIG")
        return size

    def cublaslt_workspace(self, env: Mapping[str, str] | None = None) -> int:
        env = os.environ if env is None else env
        return workspaces.cublaslt_workspace(self.cublas_workspace(env), env)

    def attention_profile(self, torch_version: tuple[int, int]) -> attention.GpuProfile:
        """What the SDPA kernel choice needs: this GPU's capability under ``torch_version``."""
        return attention.GpuProfile(sm=self.sm, torch=torch_version)

    def describe(self) -> str:
        return self.description or self.name


def _nominal(name: str, sm: tuple[int, int], gib: int, aliases: tuple[str, ...], text: str) -> DeviceProfile:
    return DeviceProfile(name, sm, gib * GIB, "nominal", aliases, text)


#: the built-in profiles (extend with the pytest_gpumem_device_profiles hook)
BUILTIN: tuple[DeviceProfile, ...] = (
    _nominal("H100-SXM", (9, 0), 80, ("H100", "H100-80GB", "H100-SXM5"), "NVIDIA H100 SXM 80GB"),
    _nominal("H100-PCIe", (9, 0), 80, ("H100-PCIE-80GB",), "NVIDIA H100 PCIe 80GB"),
    _nominal("H200", (9, 0), 141, ("H200-SXM", "H200-141GB"), "NVIDIA H200 141GB"),
    DeviceProfile("A100-40GB", (8, 0), 42_298_834_944,
                  "driver: deviceQuery of an A100-SXM4-40GB (bottlerocket-os/bottlerocket PR #3873)",
                  ("A100-SXM4-40GB", "A100-PCIE-40GB"), "NVIDIA A100 40GB"),
    _nominal("A100-80GB", (8, 0), 80, ("A100", "A100-SXM4-80GB", "A100-PCIE-80GB"), "NVIDIA A100 80GB"),
    _nominal("L4", (8, 9), 24, (), "NVIDIA L4 24GB"),
    _nominal("A10G", (8, 6), 24, (), "NVIDIA A10G 24GB"),
    _nominal("L40S", (8, 9), 48, (), "NVIDIA L40S 48GB"),
    _nominal("V100-16GB", (7, 0), 16, ("V100", "V100-SXM2-16GB", "V100-PCIE-16GB"), "NVIDIA V100 16GB"),
    _nominal("V100-32GB", (7, 0), 32, ("V100-SXM2-32GB", "V100-PCIE-32GB"), "NVIDIA V100 32GB"),
    _nominal("RTX-4090", (8, 9), 24, ("4090", "GeForce-RTX-4090"), "NVIDIA GeForce RTX 4090 24GB"),
)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find(name: str, profiles: tuple[DeviceProfile, ...] = BUILTIN) -> DeviceProfile:
    """The profile called ``name`` (or one of its aliases; case, spaces and dashes ignored)."""
    key = _key(name)
    for profile in profiles:
        if key in (_key(profile.name), *map(_key, profile.aliases)):
            return profile
    known = ", ".join(p.name for p in profiles)
    raise UnknownDevice(f"unknown GPU {name!r}: known devices are {known} "
                        "(add one with the pytest_gpumem_device_profiles hook)")


def from_properties(name: str, major: int, minor: int, total_memory: int) -> DeviceProfile:
    """The profile of a GPU present (``torch.cuda.get_device_properties``): its own name and figures."""
    return DeviceProfile(name, (major, minor), total_memory, "driver: torch.cuda.get_device_properties")
