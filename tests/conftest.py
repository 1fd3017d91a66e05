"""Shared test setup: hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default "ci")."""
from __future__ import annotations

import gc
import os
from datetime import timedelta

import pytest
from hypothesis import settings

# ci: few examples, same examples on every run (derandomize) so a red CI is reproducible, no database.
# No deadline: CI runners are shared 2-core machines where a training step's wall time varies several-fold
# with the neighbours' load; our properties are about bytes, and a deadline there would only add flakes.
settings.register_profile("ci", max_examples=20, derandomize=True, database=None, deadline=None,
                          print_blob=True)
# dev: many random examples for a local hunt. A 2 s deadline flags a strategy whose examples got so large
# that one training step takes seconds (the largest default configs take well under 1 s on the CPU).
settings.register_profile("dev", max_examples=200, deadline=timedelta(seconds=2))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One intra-op thread per xdist worker (cores / workers): `-n 2` on a 2-core runner with torch's default of one
# thread per core oversubscribes the cores, and OpenMP's spin-waiting then makes each tiny training step several
# times slower. OMP_NUM_THREADS reaches the pytest subprocesses that pytester starts. Bytes do not depend on it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, (os.cpu_count() or 1) // _workers)
os.environ["OMP_NUM_THREADS"] = str(_threads)

# pytester's in-process runs drop modules first imported inside them; torch registers operator libraries
# on import and refuses a second registration, so import what a training step pulls in once, up front.
import torch  # noqa: E402,F401
import torch.optim  # noqa: E402,F401
import torchvision  # noqa: E402,F401

torch.set_num_threads(_threads)

try:
    import torch._inductor.test_operators  # noqa: E402,F401
except ImportError:  # pragma: no cover - not present on every torch release
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A pytester test runs with this session's objects gc-frozen (torch, transformers, hypothesis, every test
    module: ~600,000), so the full collections its in-process run makes walk only what the inner session made.
    The plugin's leak check collects after every measured inner test there (0.3 s each otherwise): the in-process
    run's HookRecorder keeps every hook call's arguments, the tensors the estimate hooks are given among them.
    Only there: frozen during any other test, measure_step would skip its own freeze, and its collections would
    walk every object the test made."""
    frozen = "pytester" in getattr(item, "fixturenames", ()) and not gc.get_freeze_count()
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()
