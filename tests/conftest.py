import os

# One thread per process: the tests use tiny models, and several test processes
# (subprocess CLIs, two-process DDP) share a 2-core CI machine, where spinning OpenMP
# threads slow small steps by orders of magnitude. Set before torch is imported, so
# subprocesses inherit it, and set whatever the environment said: a kernel's workspace
# depends on the thread count (oneDNN's convolutions keep a buffer per thread), so a
# subprocess CLI must measure at the test process's count to give the same numbers.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=30)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
