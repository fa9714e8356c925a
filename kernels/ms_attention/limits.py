"""What the Triton kernels take, for the dispatcher (``interface``) and the launchers
(``triton_impl``) alike; importing it needs no Triton."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the Triton kernels take."""
MIN_GPU_HEAD_DIM = 32
"""The smallest (even) head dim the compiled kernels take: a tl.dot needs 16 columns per half."""
