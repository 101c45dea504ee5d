"""Test-wide settings: loopback networking and one thread per process (2-core CI)."""

import os

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# Modules whose tests start real processes (each imports torch: seconds of CPU). They run
# one at a time on one xdist worker ("--dist loadgroup" in setup.cfg), so that on two
# cores they never overlap each other and starve the thread-tier tests on the other
# worker past their timeouts.
_PROCESS_MODULES = {"test_process", "test_reliability", "test_security", "test_sharded", "test_demo",
                    "test_cuda", "test_nccl"}  # fmt: skip


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    import pytest

    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in _PROCESS_MODULES and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("processes"))
