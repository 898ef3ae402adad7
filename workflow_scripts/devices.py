"""What fine-tuning, evaluation and the benchmark share about the device: bf16 autocast and the
recognition of out-of-memory failures."""
from __future__ import annotations

import contextlib
import re

import torch

# Out-of-memory failures that do not arrive as torch.OutOfMemoryError (the caching allocator's error):
# a cuBLAS/cuDNN workspace or handle allocation, NCCL's buffers, a raw cudaMalloc (CUDA context,
# model.to(device), pinned memory). All are RuntimeErrors (torch.AcceleratorError, DistBackendError, ...)
# whose message says so.
_OUT_OF_MEMORY = re.compile(
    r"CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"
    r"|\b(CUDA|cuBLAS|cuDNN|NCCL)\b.*\bout of memory\b",
    re.IGNORECASE | re.DOTALL)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """protocol.precision: "bf16" always, "auto" on CUDA only (on CPU bf16 is several times slower)."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `uses_bf16`, else nothing (fp32)."""
    device = torch.device(device)
    if not uses_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def precision_name(precision: str, device: torch.device) -> str:
    return "bf16" if uses_bf16(precision, device) else "fp32"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is a device out-of-memory failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError):
            return True
        if isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False
