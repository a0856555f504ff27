"""Shared test settings.

Tests run torch on one thread: their tensors are small, and on a 2-core machine shared with
other work two OpenMP threads make small ops up to 10x slower. Set FULLSPARSE_TEST_THREADS
to change it.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("FULLSPARSE_TEST_THREADS", "1")))
