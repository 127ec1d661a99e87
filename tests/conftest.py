"""pytest set-up shared by the tests: threads per worker and generated images (nothing is downloaded).

The tiny configs and flag lists are in helpers.py."""
import os

import pytest
import torch

from demo_flowers import make_demo_flowers
from runtime import usable_cores

# Nothing is looked up outside this machine: the Hub client fails at once on a repo id instead of retrying for 20 s,
# and Gradio and the Hub send no telemetry (set before any test module imports them).
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False")

# pytest.ini runs the tests in two pytest-xdist workers. Each computes on its share of the cores: two workers of all
# cores' OpenMP threads each would wait for each other's threads (tiny steps get many times slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """12 readable 40x40 demo images; runs never write into it."""
    return make_demo_flowers(tmp_path_factory.mktemp("flowers"), num_images=12, size=40)
