"""Where and how a model runs: device, CPU thread budget, safe weight loading, autocast."""
import contextlib
import importlib
import logging
import os
import pickle

import torch

from handler_kit.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(requested: str, gpu_id) -> torch.device:
    """The GPU TorchServe assigned (``gpu_id``) when there is one, else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    if requested == "cuda":
        raise ConfigError("handler.runtime.device is 'cuda' but no GPU is available to this worker")
    return torch.device("cpu")


def available_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_budget(requested, workers: int, cores: int) -> int:
    """Intra-op threads per worker, so that workers x threads does not exceed the cores."""
    if requested:
        return int(requested)
    return max(1, cores // max(1, workers))


def apply_thread_budget(threads: int) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work ran
        torch.set_num_interop_threads(1)


def load_state_dict(path: str, device: torch.device) -> dict:
    """Load tensors only: a weights file carrying pickled code is refused, never executed."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {os.path.basename(path)} is missing from the archive")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"refusing to load {os.path.basename(path)}: it is not a plain tensor "
                          f"state_dict (weights_only load failed: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{os.path.basename(path)} holds a {type(state).__name__}, not a state_dict")
    return state


def build_model(module: str, factory: str, kwargs: dict, weights_path: str,
                device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Instantiate the architecture named in the configuration and load its weights strictly."""
    try:
        constructor = getattr(importlib.import_module(module), factory)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"handler.model: cannot import {module}.{factory}: {exc}") from None
    model = constructor(**kwargs)
    model.load_state_dict(load_state_dict(weights_path, device), strict=True)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device, dtype: str):
    """Autocast to the configured dtype, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])
