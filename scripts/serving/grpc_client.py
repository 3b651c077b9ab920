"""A client for TorchServe's gRPC APIs (inference on 7070, management on 7071), with its token.

    python -m scripts.serving.grpc_client ping
    python -m scripts.serving.grpc_client predict digits build/samples/digit_7_0.png [--version 1.0]
    python -m scripts.serving.grpc_client stream digits build/samples/digit_7_0.png
    python -m scripts.serving.grpc_client list
    python -m scripts.serving.grpc_client describe digits [--customized]

Addresses come from config.properties, the keys from the key_file.json that `make serve`'s
TorchServe wrote. TorchServe checks the gRPC metadata ``authorization: Bearer <key>`` (the
inference key on 7070, the management key on 7071) and refuses a call without a valid one with
PERMISSION_DENIED; the key is then renewed through the HTTP management API and the call retried.

A handler's per-request error (our 4xx JSON body) reaches a gRPC client as a successful answer
carrying that body: TorchServe 0.12's gRPC frontend drops the per-request status. This client
turns such a body back into an error with the status code TorchServe itself uses for that HTTP
status (400 -> INVALID_ARGUMENT, 413 -> RESOURCE_EXHAUSTED, ...).
"""
import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import grpc
from google.protobuf import empty_pb2

from scripts.build import grpc_stubs
from models.catalog import CONFIG_PROPERTIES_PATH, ROOT, parse_config_properties
from scripts.serving.ts_client import TorchServeClient, TorchServeError

METADATA_KEY = "authorization"
# What TorchServe's interceptor answers, with PERMISSION_DENIED, to a missing or stale key.
REFUSED_KEY = "Token Authorization failed"
# HTTP status -> gRPC status, as TorchServe 0.12 maps them (org.pytorch.serve.util.GRPCUtils).
GRPC_STATUS_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    416: grpc.StatusCode.OUT_OF_RANGE, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED, 501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The keys of our handlers' error body (handler_kit.errors.RequestError.to_body).
ERROR_BODY_KEYS = {"code", "type", "message"}


class GrpcError(RuntimeError):
    """A failed call: the gRPC status code and TorchServe's (or our handler's) explanation."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str,
                 http_status: Optional[int] = None):
        self.method, self.code, self.details, self.http_status = method, code, details, http_status
        origin = f" (handler answered HTTP {http_status})" if http_status else ""
        super().__init__(f"{method}: {code.name}{origin}: {details}")


def grpc_status_for_http(status: int) -> grpc.StatusCode:
    if status in GRPC_STATUS_FOR_HTTP:
        return GRPC_STATUS_FOR_HTTP[status]
    if 400 <= status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL if 500 <= status < 600 else grpc.StatusCode.UNKNOWN


def targets_from_config(props: dict) -> Tuple[str, str]:
    """(inference, management) gRPC targets of a server configured by ``props``."""
    def target(api: str, default_port: int) -> str:
        host = props.get(f"grpc_{api}_address") or "127.0.0.1"
        host = "127.0.0.1" if host == "0.0.0.0" else host
        return f"{host}:{props.get(f'grpc_{api}_port') or default_port}"
    return target("inference", 7070), target("management", 7071)


@dataclass
class Connection:
    """Stubs on open channels, and the HTTP client whose key file and renewal they share."""
    keys: TorchServeClient
    inference: Any
    management: Any
    messages: Any          # the generated modules (grpc_stubs.load())
    channels: tuple
    timeout: float = 60.0

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(keys: TorchServeClient, target: str, management_target: str,
            timeout: float = 60.0, stubs_dir: str = grpc_stubs.OUT_DIR) -> Connection:
    stubs = grpc_stubs.load(stubs_dir)
    # gRPC clients refuse answers over 4 MiB by default; TorchServe enforces its own
    # max_response_size.
    options = [("grpc.max_receive_message_length", -1)]
    inference_channel = grpc.insecure_channel(target, options=options)
    management_channel = grpc.insecure_channel(management_target, options=options)
    return Connection(
        keys=keys, messages=stubs, timeout=timeout,
        inference=stubs.inference_pb2_grpc.InferenceAPIsServiceStub(inference_channel),
        management=stubs.management_pb2_grpc.ManagementAPIsServiceStub(management_channel),
        channels=(inference_channel, management_channel))


def wait_for_channels(conn: Connection, timeout_s: float = 60.0) -> None:
    """Block until both gRPC listeners accept connections: TorchServe opens them after its HTTP
    ones, so a server answering HTTP may not be listening on gRPC yet."""
    for channel in conn.channels:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"TorchServe's gRPC port did not accept connections within "
                               f"{timeout_s:.0f} s") from None


def auth_metadata(key: Optional[str]) -> tuple:
    return ((METADATA_KEY, f"Bearer {key}"),) if key else ()


def _refused(exc: grpc.RpcError) -> bool:
    return exc.code() == grpc.StatusCode.PERMISSION_DENIED and REFUSED_KEY in (exc.details() or "")


def _error(method: str, exc: grpc.RpcError) -> GrpcError:
    return GrpcError(method, exc.code(), exc.details() or "")


def unary(conn: Connection, api: str, method: str, request, timeout: Optional[float] = None):
    """Call ``method`` of the inference or management stub with that API's key, renewing the key
    and retrying once when TorchServe refuses it (expired between our check and the call)."""
    stub = conn.inference if api == "inference" else conn.management
    for attempt in (1, 2):
        key = conn.keys.key(api)
        try:
            return getattr(stub, method)(request, metadata=auth_metadata(key),
                                         timeout=timeout or conn.timeout)
        except grpc.RpcError as exc:
            if not (_refused(exc) and key and attempt == 1):
                raise _error(method, exc) from None
        conn.keys.renew_key(api)


def decode_prediction(method: str, payload: bytes) -> Any:
    """The handler's answer: parsed JSON (raw bytes if it is not JSON); our handlers' error body
    becomes a GrpcError carrying the status TorchServe would have given that HTTP status."""
    try:
        answer = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return payload
    if isinstance(answer, dict) and ERROR_BODY_KEYS <= answer.keys() \
            and isinstance(answer["code"], int) and answer["code"] >= 400:
        raise GrpcError(method, grpc_status_for_http(answer["code"]), str(answer["message"]),
                        http_status=answer["code"])
    return answer


def predictions_request(conn: Connection, model: str, data: bytes, version: Optional[str] = None,
                        field: str = "data"):
    return conn.messages.inference_pb2.PredictionsRequest(
        model_name=model, model_version=version or "", input={field: data})


# -- inference API --------------------------------------------------------------------------
def ping(conn: Connection) -> dict:
    return json.loads(unary(conn, "inference", "Ping", empty_pb2.Empty(), timeout=10).health)


def predict(conn: Connection, model: str, data: bytes, version: Optional[str] = None) -> Any:
    response = unary(conn, "inference", "Predictions", predictions_request(conn, model, data, version))
    return decode_prediction("Predictions", response.prediction)


def stream_predict(conn: Connection, model: str, data: bytes,
                   version: Optional[str] = None) -> Iterator[Any]:
    """The answers of a streaming handler as they arrive (one for a handler that does not
    stream)."""
    request = predictions_request(conn, model, data, version)
    for attempt in (1, 2):
        key = conn.keys.key("inference")
        received = False
        try:
            for response in conn.inference.StreamPredictions(
                    request, metadata=auth_metadata(key), timeout=conn.timeout):
                received = True
                yield decode_prediction("StreamPredictions", response.prediction)
            return
        except grpc.RpcError as exc:
            if received or not (_refused(exc) and key and attempt == 1):
                raise _error("StreamPredictions", exc) from None
        conn.keys.renew_key("inference")


# -- management API -------------------------------------------------------------------------
def list_models(conn: Connection, page_size: int = 100) -> list:
    """Every registered model ({"modelName", "modelUrl"}), page by page. A limit is required:
    TorchServe answers an empty page to ListModels' default limit of 0."""
    models, offset = [], 0
    while True:
        request = conn.messages.management_pb2.ListModelsRequest(limit=page_size,
                                                                 next_page_token=offset)
        page = json.loads(unary(conn, "management", "ListModels", request).msg)
        models += page["models"]
        if not page.get("nextPageToken"):
            return models
        offset = int(page["nextPageToken"])


def describe_model(conn: Connection, model: str, version: Optional[str] = None,
                   customized: bool = False) -> list:
    request = conn.messages.management_pb2.DescribeModelRequest(
        model_name=model, model_version=version or "", customized=customized)
    return json.loads(unary(conn, "management", "DescribeModel", request).msg)


def unregister_model(conn: Connection, model: str, version: Optional[str] = None) -> str:
    request = conn.messages.management_pb2.UnregisterModelRequest(model_name=model,
                                                                  model_version=version or "")
    return unary(conn, "management", "UnregisterModel", request).msg


def register_model(conn: Connection, url: str, **fields) -> str:
    """RegisterModel; ``fields`` are RegisterModelRequest's (model_name, initial_workers, ...)."""
    request = conn.messages.management_pb2.RegisterModelRequest(url=url, **fields)
    return unary(conn, "management", "RegisterModel", request, timeout=600).msg


# -- command line ---------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG_PROPERTIES_PATH,
                        help="config.properties giving the default addresses")
    parser.add_argument("--target", help="gRPC inference address (default: from --config)")
    parser.add_argument("--management-target", help="gRPC management address (default: from --config)")
    parser.add_argument("--home", default=ROOT, help="folder holding TorchServe's key_file.json")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="server health")
    for name, what in (("predict", "one answer (Predictions)"),
                       ("stream", "the answers as they arrive (StreamPredictions)")):
        command = commands.add_parser(name, help=what)
        command.add_argument("model")
        command.add_argument("file")
        command.add_argument("--version")
    commands.add_parser("list", help="registered models (ListModels)")
    describe = commands.add_parser("describe", help="a model's workers and settings (DescribeModel)")
    describe.add_argument("model")
    describe.add_argument("--version")
    describe.add_argument("--customized", action="store_true", help="include the archive's meta")
    return parser.parse_args(argv)


def run(conn: Connection, args) -> None:
    def show(value):
        if isinstance(value, bytes):  # a handler answering something other than JSON
            print(value.decode("utf-8", errors="backslashreplace"))
        else:
            print(json.dumps(value, indent=2))

    if args.command == "ping":
        show(ping(conn))
    elif args.command in ("predict", "stream"):
        with open(args.file, "rb") as f:
            data = f.read()
        if args.command == "predict":
            show(predict(conn, args.model, data, args.version))
        else:
            for answer in stream_predict(conn, args.model, data, args.version):
                show(answer)
    elif args.command == "list":
        show(list_models(conn))
    else:
        show(describe_model(conn, args.model, args.version, args.customized))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as f:
            props = parse_config_properties(f.read())
        target, management_target = targets_from_config(props)
        # The HTTP management API is where expired keys are renewed.
        keys = TorchServeClient(props["inference_address"], props["management_address"], args.home)
        with connect(keys, args.target or target, args.management_target or management_target,
                     args.timeout) as conn:
            run(conn, args)
    except (GrpcError, TorchServeError, OSError, KeyError) as exc:
        print(f"grpc_client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
