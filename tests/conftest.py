"""Settings for the whole test suite. What the test files share (paths, runners, readers of a run's
out_dir) is in helpers.py."""
import os

import torch

# The models here are tiny. With two intra-op threads on a 2-core machine that is also running the
# subprocesses some tests start, each op spent most of its time at OpenMP barriers: runs took
# 10-100x longer than with one thread. Subprocesses started by the tests inherit the setting.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
