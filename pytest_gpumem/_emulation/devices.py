"""Which GPU the emulated backend predicts for: the built-in profiles plus those hooks add, found by name."""
from __future__ import annotations

from typing import Any, Iterable

from .._cuda_facts.devices import BUILTIN, GIB, DeviceProfile, UnknownDevice, find, from_properties


def known_profiles(hook: Any = None) -> tuple[DeviceProfile, ...]:
    """Built-in profiles, then every ``pytest_gpumem_device_profiles`` answer (``hook``: pytest's
    ``config.hook``; None: the pytest-free plugin manager of ``register_formulas``)."""
    if hook is None:
        from .._estimate.plugins import plugin_manager

        hook = plugin_manager.hook
    extra: list[DeviceProfile] = []
    for answer in hook.pytest_gpumem_device_profiles():
        extra.extend(_checked(answer))
    profiles = (*BUILTIN, *extra)
    seen: dict[str, str] = {}
    for profile in profiles:
        for name in (profile.name, *profile.aliases):
            key = "".join(ch for ch in name.lower() if ch.isalnum())
            if key in seen:
                raise UnknownDevice(f"device name {name!r} is given by two profiles ({seen[key]} and {profile.name}); "
                                    "rename one")
            seen[key] = profile.name
    return profiles


def _checked(answer: Iterable[Any]) -> list[DeviceProfile]:
    items = list(answer or ())
    wrong = [repr(x) for x in items if not isinstance(x, DeviceProfile)]
    if wrong:
        raise TypeError(f"pytest_gpumem_device_profiles must return DeviceProfile objects, got {', '.join(wrong)}")
    return items


def resolve(name: str | DeviceProfile | None, hook: Any = None) -> DeviceProfile | None:
    """The profile called ``name`` (a profile passes through; None stays None); UnknownDevice lists the known ones."""
    if name is None or isinstance(name, DeviceProfile):
        return name
    return find(name, known_profiles(hook))


def present_gpu(device: Any) -> DeviceProfile:
    """The GPU present (cuda backend): its name, capability and memory as the driver reports them."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return from_properties(props.name, props.major, props.minor, props.total_memory)


def same_gpu(asked: DeviceProfile, present: DeviceProfile) -> bool:
    """Whether the GPU present is the one asked for: same compute capability and memory within 10%."""
    return asked.sm == present.sm and abs(asked.total_memory - present.total_memory) <= 0.1 * asked.total_memory


class DeviceMismatchWarning(UserWarning):
    """The GPU present is not the one --gpumem-device or the marker names; the one present is measured."""


def device_for_test(budget: Any, backend: str, option_name: str | None, config: Any = None) -> tuple[Any, DeviceProfile | None]:
    """The test's target GPU (marker ``device=`` over ``--gpumem-device``; on the cuda backend the GPU
    present) and its budget with a share of memory turned into bytes. BudgetError names what is wrong."""
    import warnings

    import torch

    from .._core.budget import BudgetError

    asked_name = (budget.device if budget is not None and budget.device else None) or option_name
    try:
        asked = resolve(asked_name, getattr(config, "hook", None))
    except UnknownDevice as exc:
        raise BudgetError(f"device={asked_name!r}: {exc}") from None
    device = asked
    if backend == "cuda" or (backend == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available():
            device = present_gpu(torch.cuda.current_device())
            if asked is not None and not same_gpu(asked, device):
                warnings.warn(DeviceMismatchWarning(
                    f"measuring on the GPU present, {device.name} (sm{device.sm[0]}{device.sm[1]}, "
                    f"{device.total_memory / GIB:.1f} GiB), not the {asked.name} (sm{asked.sm[0]}{asked.sm[1]}, "
                    f"{asked.total_memory / GIB:.1f} GiB) asked for; budgets given as a share of memory use the GPU "
                    "present. Run with --gpumem-backend=emulated to predict the other GPU"))
    if budget is not None:
        budget = budget.with_device_total(device.name if device else None, device.total_memory if device else None)
    return budget, device
