"""`pytest -p tests.hostile.fake_gpu`: torch in the test process behaves as on a node with one GPU that has not
been initialised yet: torch.cuda.is_available() is True unless CUDA_VISIBLE_DEVICES hides the device ("" or
-1, read when asked, as CUDA reads it when it initialises). Anything that then really uses the device fails
(there is none), which is what a test that meant the CPU but did not say so runs into on a GPU node.
Only this process: jobs the tests start see the real machine (`make test-hostile`)."""
from __future__ import annotations

import os

import torch


def _visible() -> int:
    return 0 if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1") else 1


torch.cuda.is_available = lambda: _visible() == 1
torch.cuda.device_count = _visible
