"""Where and how a model runs: device, CPU thread budget, safe weight loading, autocast."""
import contextlib
import importlib
import logging
import math
import os
import pickle
import re
import warnings

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
    """Cores this process may run on, not the host's: CPU affinity (a container's cpuset) and the
    cgroup CPU quota (Kubernetes CPU limits leave the affinity at every core of the node)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup"):
    """CPUs allowed by the cgroup quota (v2 cpu.max, v1 cpu.cfs_quota_us), or None if unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def thread_budget(requested, workers: int, cores: int) -> int:
    """Intra-op threads per worker, so that workers x threads does not exceed the cores."""
    if requested:
        return int(requested)
    return max(1, cores // max(1, workers))


def apply_thread_budget(threads: int) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work ran
        torch.set_num_interop_threads(1)


def unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights_only error that names what was refused (e.g. 'Unsupported
    global: GLOBAL os.system'), without its terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    named = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (named or [line for line in lines if line] or ["unknown reason"])[0]


def load_state_dict(path: str, device: torch.device) -> dict:
    """Load tensors only: a weights file carrying pickled code is refused, never executed."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {os.path.basename(path)} is missing from the archive")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"refusing to load {os.path.basename(path)}: it is not a plain tensor "
                          f"state_dict (weights_only load failed: {unpickler_reason(exc)})") from None
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


class EagerRunner:
    """An nn.Module from a state_dict, optionally autocast and/or torch.compile'd."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: str, compile_model: bool):
        warn_if_slow_autocast(device, dtype)
        self.model = torch.compile(model) if compile_model else model
        self.device, self.dtype = device, dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return self.model(batch.to(self.device, non_blocking=True))


class TorchScriptRunner:
    """A traced and frozen TorchScript module (fp32 or int8); loading it runs no pickled code."""

    def __init__(self, path: str, device: torch.device, quantized: bool):
        if not os.path.isfile(path):
            raise ConfigError(f"model file {os.path.basename(path)} is missing from the archive")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still served
            model = torch.jit.load(path, map_location=device).eval()
            if not quantized:  # oneDNN conv fusions and prepacked weights, for this machine
                model = torch.jit.optimize_for_inference(model)
        self.model, self.device = model, device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device, non_blocking=True))


class OnnxRunner:
    """An ONNX model served by ONNX Runtime, on CUDA when the worker has a GPU."""

    def __init__(self, path: str, device: torch.device, threads: int):
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("handler.model.format 'onnx' needs the onnxruntime package in the "
                              "worker's environment (pip install onnxruntime)") from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ConfigError("this worker has a GPU but onnxruntime has no CUDAExecutionProvider; "
                                  "install onnxruntime-gpu or set handler.runtime.device: cpu")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ORT threads spin by default, taking the CPU the frontend and preprocessing need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(path, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu").contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_runner(model_spec, runtime_spec, model_dir: str, device: torch.device, threads: int):
    """The one runtime this archive's configuration names; its optional packages are imported
    only on that path, and a missing one fails the load."""
    path = os.path.join(model_dir, model_spec.weights)
    if model_spec.quantization == "int8_x86":
        if device.type != "cpu":
            raise ConfigError(f"this archive holds an int8_x86 quantized model, which runs on CPU only, "
                              f"but the worker was given {device}; serve the fp32 or amp variant on a "
                              f"GPU, or set handler.runtime.device: cpu")
        torch.backends.quantized.engine = "x86"
    if model_spec.format == "torchscript":
        return TorchScriptRunner(path, device, quantized=model_spec.quantization != "none")
    if model_spec.format == "onnx":
        return OnnxRunner(path, device, threads)
    model = build_model(model_spec.module, model_spec.factory, model_spec.kwargs, path, device,
                        runtime_spec.channels_last)
    return EagerRunner(model, device, runtime_spec.dtype, runtime_spec.compile)


def warn_if_slow_autocast(device: torch.device, dtype: str) -> None:
    """bfloat16 autocast on a CPU without native bf16 (AVX512-BF16/AMX) is emulated: measured
    several times slower than float32 on an AVX2-only CPU. Say so in the model log."""
    if device.type == "cpu" and dtype == "bfloat16":
        capability = torch.backends.cpu.get_cpu_capability()
        if "AVX512" not in capability:
            logger.warning("bfloat16 autocast on a CPU with %s only: expect it to be slower than "
                           "float32 here; prefer the int8 or fp32 variants on this machine", capability)


def autocast(device: torch.device, dtype: str):
    """Autocast to the configured dtype, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])
