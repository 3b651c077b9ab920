"""Dynamic int8 quantization, shared by the families that offer it (text, tabular): nn.Linear
weights to int8 at load, activations quantized on the fly, CPU only."""
import warnings

import torch

from handler_kit.errors import ConfigError


def check_dynamic_int8_worker(quantization: str, device) -> None:
    """At load, for the device TorchServe actually gave the worker (auto -> a GPU); the configured
    device is checked with the configuration (config.check_dynamic_int8_device)."""
    if quantization == "dynamic_int8" and device.type != "cpu":
        raise ConfigError(f"handler.runtime.quantization dynamic_int8 runs on CPU only, but the worker "
                          f"was given {device}; set handler.runtime.device: cpu, or quantization: none")


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """nn.Linear weights to int8, activations quantized on the fly: CPU only, no calibration.

    Weights get one scale per output channel: with a single scale per tensor, MiniLM's vectors
    drift to cosine 0.92 of fp32's on short sentences; per channel keeps them above 0.96."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao eager quantization warns that it moves to torchao; it still works in this torch.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
