"""CUDA out-of-memory inside a batch: free the cached memory and run the batch again in halves.

A batch that does not fit is split along its first dimension, recursively, so that every request
that fits on its own is still answered; a single request that still runs out of memory fails
alone with a 503 (the GPU is busy or too small now, the request itself is fine).
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from handler_kit.batching import Batch
from handler_kit.errors import OutOfMemory

logger = logging.getLogger(__name__)


@dataclass
class SplitRun:
    """Outcome of a batch run with out-of-memory splitting."""
    outputs: Any                 # the outputs of the items that ran, in input order (None if none)
    ran: List[int]               # indices (into the inputs) of those items
    errors: Dict[int, OutOfMemory] = field(default_factory=dict)  # index -> its error
    failed_sizes: List[int] = field(default_factory=list)  # size of every run that ran out


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError older paths raise (TorchScript wraps the
    allocator's message in its own RuntimeError: 'CUDA out of memory', 'CUDA error: out of memory')."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, so that the retry can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log_out_of_memory(size: int) -> None:
    logger.warning("out of memory on a batch of %d: cached memory freed, %s", size,
                   "retrying in halves" if size > 1 else "failing this request alone")


def concatenate(parts: List[Any]) -> Any:
    """Join the outputs of consecutive chunks: tensors along dim 0, lists end to end, tuples
    (several outputs per chunk, e.g. vectors and flags) element by element."""
    if not parts:
        return None
    if isinstance(parts[0], tuple):
        return tuple(concatenate(list(column)) for column in zip(*parts))
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=0)
    return [item for part in parts for item in part]


def run_with_oom_split(run: Callable[[Any], Any], inputs: Any,
                       on_oom: Optional[Callable[[int], None]] = log_out_of_memory,
                       free_memory: Callable[[], None] = release_cached_memory) -> SplitRun:
    """``run(inputs[i:j])`` over the batch, halving any chunk that runs out of memory.

    ``inputs`` is anything sliceable along its first dimension (a tensor, a list). Errors other
    than out-of-memory propagate unchanged. ``on_oom(size)`` is told of every chunk that ran out.
    """
    result = SplitRun(outputs=None, ran=[])
    parts: List[Any] = []
    pending = [(0, len(inputs))]  # a stack of [start, end) chunks, first chunk on top
    while pending:
        start, end = pending.pop()
        out_of_memory = False
        try:
            parts.append(run(inputs[start:end]))
        except Exception as exc:  # noqa: BLE001  only out-of-memory is handled; the rest re-raises
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True
        # Outside the except block: the traceback (and the tensors its frames hold) is gone,
        # so that emptying the cache can release their memory.
        if not out_of_memory:
            result.ran.extend(range(start, end))
            continue
        size = end - start
        result.failed_sizes.append(size)
        free_memory()
        if on_oom is not None:
            on_oom(size)
        if size == 1:
            result.errors[start] = OutOfMemory(
                "the model ran out of GPU memory even for this request alone; try again later")
            continue
        middle = start + size // 2
        pending += [(middle, end), (start, middle)]
    result.outputs = concatenate(parts)
    return result


def move_failures_to_errors(batch: Batch, errors: Dict[int, Exception]) -> None:
    """Items that failed alone (indices into ``batch.items``) become their requests' errors, so
    that ``batching.merge`` answers them with their status and the rest with their results."""
    if not errors:
        return
    keep = [i for i in range(len(batch.items)) if i not in errors]
    for item_index, error in errors.items():
        batch.errors[batch.good_indices[item_index]] = error
    batch.good_indices = [batch.good_indices[i] for i in keep]
    batch.items = [batch.items[i] for i in keep]
