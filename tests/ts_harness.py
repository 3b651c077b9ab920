"""Runs an archive's handler in-process through TorchServe's own Python classes.

Requests are encoded in the frontend's binary frame format and read back with TorchServe's own
reader (ts.protocol.otf_message_handler), so that JSON/text/bytes arrive exactly as in a worker;
the model is loaded by TorchServe's model loader, as model_service_worker does.
"""
import io
import json
import struct
from typing import List, Sequence, Tuple

from ts.protocol.otf_message_handler import _retrieve_inference_msg
from ts.service import Service

from scripts.build.in_process import load_service  # noqa: F401  (the tests load archives through it)


class _Socket:
    def __init__(self, data: bytes):
        self._buffer = io.BytesIO(data)

    def recv(self, length: int) -> bytes:
        return self._buffer.read(length)


def _frame_bytes(value: bytes) -> bytes:
    return struct.pack("!i", len(value)) + value


def encode_batch(requests: Sequence[Tuple[str, str, bytes]]) -> bytes:
    """Frames for (parameter name, content type, raw bytes) requests, one parameter each."""
    out = b""
    for i, (name, content_type, value) in enumerate(requests):
        out += _frame_bytes(f"req-{i}".encode())
        out += struct.pack("!i", -1)  # no headers
        out += _frame_bytes(name.encode()) + _frame_bytes(content_type.encode()) + _frame_bytes(value)
        out += struct.pack("!i", -1)  # end of parameters
    return out + struct.pack("!i", -1)  # end of batch


def infer(service: Service, requests: Sequence[Tuple[str, str, bytes]]) -> List[Tuple[int, object]]:
    """(status code, response) per request: the handler's JSON text decoded, as a client reads it."""
    batch = _retrieve_inference_msg(_Socket(encode_batch(requests)))
    headers, input_batch, req_id_map = Service.retrieve_data_for_inference(batch)
    context = service.context
    context.request_ids = req_id_map
    context.request_processor = headers
    context.metrics.request_ids = req_id_map
    outputs = service._entry_point(input_batch, context)
    assert len(outputs) == len(requests)
    return [(context.get_response_status(i)[0], _decoded(out, context.get_response_content_type(i)))
            for i, out in enumerate(outputs)]


def _decoded(out, content_type):
    if isinstance(out, str) and content_type == "application/json":
        return json.loads(out)
    return out
