import os
import sys

# The tests import the installed package (--import-mode=importlib keeps the source tree off sys.path);
# only this directory is added, for the shared helpers in common.py.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

# A test that hangs (a decoder's pipeline, a process group, a thread) fails after this long instead of stalling the
# suite (pytest-timeout, from the test extra); the slowest test takes about two minutes on 2 cores.
TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
