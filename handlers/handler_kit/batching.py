"""Per-request stages inside a server-side batch: one bad request must not fail the others."""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

from handler_kit.errors import RequestError


@dataclass
class Batch:
    """Outcome of preparing a batch: inputs of the good requests, errors of the bad ones."""
    size: int
    good_indices: List[int] = field(default_factory=list)
    items: List[Any] = field(default_factory=list)
    errors: Dict[int, RequestError] = field(default_factory=dict)


def prepare(requests: Sequence[Any], stage: Callable[[Any], Any]) -> Batch:
    """Apply ``stage`` to each request; a RequestError is kept for that request only."""
    batch = Batch(size=len(requests))
    for idx, request in enumerate(requests):
        try:
            item = stage(request)
        except RequestError as exc:
            batch.errors[idx] = exc
            continue
        batch.good_indices.append(idx)
        batch.items.append(item)
    return batch


def split_counts(items: Sequence, counts: Sequence[int]) -> list:
    """Cut a flat sequence back into consecutive per-request chunks of the given sizes."""
    chunks, start = [], 0
    for count in counts:
        chunks.append(items[start:start + count])
        start += count
    if start != len(items):
        raise ValueError(f"{len(items)} items but counts add up to {start}")
    return chunks


def merge(batch: Batch, results: Sequence[Any], context=None) -> list:
    """One response per request, in request order. A failed request gets its status and a JSON
    body through TorchServe's per-request ``context.set_response_status``."""
    responses: list = [None] * batch.size
    for idx, result in zip(batch.good_indices, results):
        responses[idx] = result
    # Under a request envelope (KServe's runtime sets TS_SERVICE_ENVELOPE) the batch holds the
    # instances of one request: a failed instance is answered in place, the request keeps its 200.
    # context is None during a handler's warm-up, before any request.
    per_request = (context is not None and not os.environ.get("TS_SERVICE_ENVELOPE")
                   and len(getattr(context, "request_ids", None) or {}) == batch.size)
    for idx, error in batch.errors.items():
        if per_request:
            context.set_response_status(error.status, error.message, idx)
        responses[idx] = error.to_body()
    if per_request:
        version = model_version(context)
        for idx in range(batch.size):
            responses[idx] = compact_json(responses[idx])
            context.set_response_content_type(idx, JSON_TYPE)
            # gRPC requests carry no url_path (HTTP ones do). TorchServe 0.12's StreamPredictions
            # needs ts_stream_next=false on a one-part answer, or its frontend throws and restarts
            # the worker; over HTTP the header would turn the answer into an endless chunked stream.
            if context.get_request_header(idx, "url_path") is None:
                context.set_response_header(idx, "ts_stream_next", "false")
            elif version:
                # Which version answered, for clients (and tests) that cannot tell from the body:
                # /predictions/<name> follows the default version, which may change at any time.
                context.set_response_header(idx, VERSION_HEADER, version)
    return responses


VERSION_HEADER = "X-Model-Version"
JSON_TYPE = "application/json"


def compact_json(answer):
    """The answer as the JSON text sent on the wire. TorchServe writes any other object with
    json.dumps(indent=2) (a 384-d embedding: 10.7 KB); a str goes out as it is. Bytes and str
    answers are left alone."""
    if isinstance(answer, (str, bytes, bytearray)):
        return answer
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


def model_version(context) -> str:
    """The archive's version (torch-model-archiver --version), as TorchServe loaded it."""
    manifest = getattr(context, "manifest", None) or {}
    return str(manifest.get("model", {}).get("modelVersion", "") or "")
