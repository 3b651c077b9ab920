"""The gRPC client (scripts/serving/grpc_client.py) against a real TorchServe on free 127.0.0.1 ports, and
the project's protos against the descriptors compiled into TorchServe's own frontend."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

import grpc
import pytest
from google.protobuf import descriptor_pb2, empty_pb2
from google.protobuf.message import DecodeError

from scripts.serving import grpc_client
from scripts.build import grpc_stubs
from models.catalog import parse_config_properties
from scripts.serving.ts_server import TorchServe
from tests.answers import assert_answers_close

# Test-only archive: a handler that streams each word of the request as its own answer.
STREAMING_HANDLER = '''
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if not data:
        return None
    words = bytes(data[0]["data"]).decode().split()
    for word in words[:-1]:
        send_intermediate_predict_response([word], context.request_ids, "partial answer", 200,
                                           context)
    return [words[-1]]
'''


def build_streaming_archive(store, workdir) -> str:
    handler = os.path.join(workdir, "stream_words.py")
    with open(handler, "w", encoding="utf-8") as f:
        f.write(STREAMING_HANDLER)
    archiver = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
    subprocess.run([archiver, "--model-name", "stream_words", "--version", "1.0", "--handler",
                    handler, "--export-path", str(store), "--force"], check=True)
    return "stream_words.mar"


def grpc_targets(ts: TorchServe):
    with open(ts.config_path, encoding="utf-8") as f:
        return grpc_client.targets_from_config(parse_config_properties(f.read()))


@pytest.fixture(scope="module")
def server(catalog, model_store, tmp_path_factory, torchserve_factory):
    """TorchServe with digits (registered through gRPC with its catalog settings) and the
    streaming test archive; yields (server, gRPC connection)."""
    store = tmp_path_factory.mktemp("grpc-store")
    digits = catalog.model("digits")
    shutil.copy(os.path.join(model_store, digits.mar_name), store)
    streaming = build_streaming_archive(store, tmp_path_factory.mktemp("grpc-handler"))
    with torchserve_factory.start("ts-grpc", catalog=catalog, store=str(store)) as ts:
        conn = grpc_client.connect(ts.client, *grpc_targets(ts))
        try:
            grpc_client.wait_for_channels(conn, 120)
            grpc_client.register_model(conn, digits.mar_name, synchronous=True, **digits.registration())
            grpc_client.register_model(conn, streaming, model_name="stream_words", initial_workers=1,
                                       synchronous=True)
            ts.client.wait_ready(["digits", "stream_words"], 180)
            yield ts, conn
        finally:
            conn.close()


@pytest.fixture(scope="module")
def digit_pngs(samples):
    _, _, images, labels = samples.digits_split()
    return [(samples.png_bytes(p), str(label)) for p, label in zip(images[:12], labels[:12])]


def raw_call(method, request, key=None):
    """A stub call as any gRPC client makes it, without this project's client."""
    return method(request, metadata=grpc_client.auth_metadata(key), timeout=30)


class RevokedKeyFirst:
    """Hands out a revoked key once, as when a key expires between reading it and the call."""

    def __init__(self, keys, revoked: dict):
        self.keys, self.revoked, self.renewed = keys, dict(revoked), []

    def key(self, kind):
        return self.revoked.pop(kind, None) or self.keys.key(kind)

    def renew_key(self, kind):
        self.renewed.append(kind)
        self.keys.renew_key(kind)


# -- protos and stubs -----------------------------------------------------------------------
def java_class_strings(class_bytes: bytes) -> list:
    """The CONSTANT_Utf8 entries of a Java class file's constant pool, as stored."""
    count, offset, index, strings = int.from_bytes(class_bytes[8:10], "big"), 10, 1, []
    sizes = {3: 4, 4: 4, 5: 8, 6: 8, 7: 2, 8: 2, 9: 4, 10: 4, 11: 4, 12: 4, 15: 3, 16: 2, 17: 4,
             18: 4, 19: 2, 20: 2}
    while index < count:
        tag = class_bytes[offset]
        if tag == 1:
            length = int.from_bytes(class_bytes[offset + 1:offset + 3], "big")
            strings.append(class_bytes[offset + 3:offset + 3 + length])
            offset += 3 + length
        else:
            offset += 1 + sizes[tag]
        index += 2 if tag in (5, 6) else 1  # longs and doubles take two slots
    return strings


def frontend_descriptor(class_path: str, file_name: str) -> descriptor_pb2.FileDescriptorProto:
    """The descriptor protobuf-java compiled into TorchServe's frontend jar: a string constant
    whose chars are the descriptor's bytes (Java's modified UTF-8 writes NUL as C0 80)."""
    import ts
    jar = os.path.join(os.path.dirname(ts.__file__), "frontend", "model-server.jar")
    with zipfile.ZipFile(jar) as archive:
        class_bytes = archive.read(class_path)
    for raw in java_class_strings(class_bytes):
        try:
            blob = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8").encode("latin-1")
            descriptor = descriptor_pb2.FileDescriptorProto.FromString(blob)
        except (UnicodeError, DecodeError):
            continue
        if descriptor.name == file_name and descriptor.SerializeToString() == blob:
            return descriptor
    raise AssertionError(f"no descriptor of {file_name} in {class_path} of {jar}")


def wire_shape(descriptor, renamed_types=None) -> dict:
    """What decides interoperability: package, every field's name/number/type/label, every
    method's name/types/streaming."""
    renamed_types = renamed_types or {}

    def messages(types, prefix):
        out = {}
        for message in types:
            name = prefix + message.name
            out[name] = [(f.name, f.number, f.type, f.label, f.proto3_optional,
                          renamed_types.get(f.type_name, f.type_name)) for f in message.field]
            out.update(messages(message.nested_type, name + "."))
        return out

    services = {s.name: [(m.name, m.input_type, m.output_type, m.client_streaming,
                          m.server_streaming) for m in s.method] for s in descriptor.service}
    return {"package": descriptor.package, "messages": messages(descriptor.message_type, ""),
            "services": services}


def our_descriptor(module) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def test_inference_proto_matches_torchserve_frontend():
    stubs = grpc_stubs.load()
    ours = our_descriptor(stubs.inference_pb2)
    theirs = frontend_descriptor("org/pytorch/serve/grpc/inference/Inference.class", "inference.proto")
    status = ".org.pytorch.serve.grpc.inference.RpcStatus"
    expected = wire_shape(theirs, {".google.rpc.Status": status})
    actual = wire_shape(ours)
    # Our stand-in for google.rpc.Status (google/rpc/status.proto is not shipped with grpcio-tools)
    rpc_status = actual["messages"].pop("RpcStatus")
    assert actual == expected
    assert [(f[0], f[1], f[2], f[3]) for f in rpc_status] == [
        ("code", 1, descriptor_pb2.FieldDescriptorProto.TYPE_INT32, 1),
        ("message", 2, descriptor_pb2.FieldDescriptorProto.TYPE_STRING, 1),
        ("details", 3, descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, 3)]


def test_management_proto_matches_torchserve_frontend():
    stubs = grpc_stubs.load()
    theirs = frontend_descriptor("org/pytorch/serve/grpc/management/Management.class",
                                 "management.proto")
    assert wire_shape(our_descriptor(stubs.management_pb2)) == wire_shape(theirs)


def test_stubs_regenerate_into_a_folder_only_when_a_proto_changes(tmp_path):
    protos = tmp_path / "proto"
    shutil.copytree(grpc_stubs.PROTO_DIR, protos)
    out = grpc_stubs.generate(str(tmp_path / "stubs"), proto_dir=str(protos))
    files = grpc_stubs.outputs(out)
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    assert grpc_stubs.generate(out, proto_dir=str(protos)) == out
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps  # up to date: not rewritten
    newer = max(stamps.values()) / 1e9 + 10
    os.utime(protos / "management.proto", (newer, newer))
    grpc_stubs.generate(out, proto_dir=str(protos))
    assert all(os.stat(f).st_mtime_ns > stamps[f] for f in files)
    assert not [n for n in os.listdir(out) if n.startswith(".staging")]
    imported = subprocess.run(  # a fresh process: the modules import from the folder alone
        [sys.executable, "-c", "import sys; from scripts.build import grpc_stubs; "
         "s = grpc_stubs.import_stubs(sys.argv[1]); i, m = s.inference_pb2_grpc, s.management_pb2_grpc; "
         "print(i.InferenceAPIsServiceStub.__name__, m.ManagementAPIsServiceStub.__name__, "
         "i.inference__pb2 is s.inference_pb2 and m.management__pb2 is s.management_pb2, "
         "s.inference_pb2.__file__.startswith(sys.argv[1]))", out],
        capture_output=True, text=True, check=True)
    assert imported.stdout.split() == ["InferenceAPIsServiceStub", "ManagementAPIsServiceStub", "True", "True"]


def test_a_broken_proto_fails_generation_with_a_clear_error(tmp_path):
    protos = tmp_path / "proto"
    shutil.copytree(grpc_stubs.PROTO_DIR, protos)
    (protos / "management.proto").write_text('syntax = "proto3";\nmessage Broken { strin x = 1; }\n')
    with pytest.raises(grpc_stubs.StubGenerationError, match="protoc failed"):
        grpc_stubs.generate(str(tmp_path / "stubs"), proto_dir=str(protos))


# -- client without a server ----------------------------------------------------------------
def test_handler_error_bodies_become_grpc_errors():
    body = json.dumps({"code": 413, "type": "too_large", "message": "image is too big"}).encode()
    with pytest.raises(grpc_client.GrpcError) as error:
        grpc_client.decode_prediction("Predictions", body)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.http_status == 413 and error.value.details == "image is too big"
    answer = [{"label": "7", "index": 7, "probability": 0.99}]
    assert grpc_client.decode_prediction("Predictions", json.dumps(answer).encode()) == answer
    assert grpc_client.decode_prediction("Predictions", b"\x89PNG") == b"\x89PNG"
    assert grpc_client.grpc_status_for_http(415) == grpc.StatusCode.FAILED_PRECONDITION


def test_targets_come_from_the_server_configuration():
    assert grpc_client.targets_from_config({}) == ("127.0.0.1:7070", "127.0.0.1:7071")
    props = {"grpc_inference_address": "0.0.0.0", "grpc_inference_port": "17070",
             "grpc_management_address": "10.0.0.5", "grpc_management_port": "17071"}
    assert grpc_client.targets_from_config(props) == ("127.0.0.1:17070", "10.0.0.5:17071")


def test_command_line_reports_an_unreachable_server(tmp_path, capsys):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\nmanagement_address=http://127.0.0.1:9\n"
                      "grpc_inference_port=9\ngrpc_management_port=9\n")
    assert grpc_client.main(["--config", str(config), "--home", str(tmp_path), "ping"]) == 1
    assert "Ping: UNAVAILABLE" in capsys.readouterr().err


# -- against TorchServe ---------------------------------------------------------------------
@pytest.mark.integration
def test_ping_needs_the_inference_key(server):
    ts, conn = server
    for key in (None, "not-a-key", ts.client.key("management")):
        with pytest.raises(grpc.RpcError) as refused:
            raw_call(conn.inference.Ping, empty_pb2.Empty(), key)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "Token Authorization failed" in refused.value.details()
    health = raw_call(conn.inference.Ping, empty_pb2.Empty(), ts.client.key("inference")).health
    assert json.loads(health) == {"status": "Healthy"}
    assert grpc_client.ping(conn) == {"status": "Healthy"}


@pytest.mark.integration
def test_a_revoked_key_is_renewed_and_the_call_retried(server):
    ts, conn = server
    revoked = {kind: ts.client.key(kind) for kind in ("inference", "management")}
    for kind in revoked:
        ts.client.renew_key(kind)
    with pytest.raises(grpc.RpcError) as refused:
        raw_call(conn.inference.Ping, empty_pb2.Empty(), revoked["inference"])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    keys = RevokedKeyFirst(ts.client, revoked)
    stale = dataclasses.replace(conn, keys=keys)
    assert grpc_client.ping(stale) == {"status": "Healthy"}
    assert "digits" in {m["modelName"] for m in grpc_client.list_models(stale)}
    assert keys.renewed == ["inference", "management"]


@pytest.mark.integration
def test_predictions_agree_with_the_http_api(server, digit_pngs, catalog):
    ts, conn = server
    correct = 0
    for png, label in digit_pngs:
        answer = grpc_client.predict(conn, "digits", png)
        assert_answers_close(answer, ts.client.predict("digits", png), "gRPC vs HTTP")
        correct += answer[0]["label"] == label
    assert correct >= len(digit_pngs) - 1  # the model's held-out accuracy is about 99%
    png, label = digit_pngs[0]
    version = catalog.model("digits").version
    assert grpc_client.predict(conn, "digits", png, version=version)[0]["label"] == label


@pytest.mark.integration
def test_truncated_png_is_invalid_argument_with_the_handlers_message(server, digit_pngs):
    ts, conn = server
    png = digit_pngs[0][0]
    truncated = png[:len(png) - 20]
    # What any gRPC client sees: TorchServe 0.12 drops the handler's per-request status, the
    # call succeeds and carries our JSON error body.
    request = grpc_client.predictions_request(conn, "digits", truncated)
    body = json.loads(raw_call(conn.inference.Predictions, request, ts.client.key("inference")).prediction)
    assert body["code"] == 400 and body["type"] == "bad_input"
    with pytest.raises(grpc_client.GrpcError) as error:
        grpc_client.predict(conn, "digits", truncated)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.http_status == 400
    assert "PNG image could not be decoded" in error.value.details
    assert "INVALID_ARGUMENT" in str(error.value) and "PNG image could not be decoded" in str(error.value)


@pytest.mark.integration
def test_unknown_model_or_version_is_an_error_naming_it(server, digit_pngs):
    _, conn = server
    png = digit_pngs[0][0]
    with pytest.raises(grpc_client.GrpcError, match="Model not found: no_such_model"):
        grpc_client.predict(conn, "no_such_model", png)
    with pytest.raises(grpc_client.GrpcError, match="Model version: 9.9 does not exist"):
        grpc_client.predict(conn, "digits", png, version="9.9")


@pytest.mark.integration
def test_stream_predictions_deliver_each_part_of_a_streaming_handler(server):
    _, conn = server
    parts = list(grpc_client.stream_predict(conn, "stream_words", b"one two three"))
    assert parts == [b"one", b"two", b"three"]


@pytest.mark.integration
def test_management_calls_need_the_management_key(server, catalog):
    ts, conn = server
    request = conn.messages.management_pb2.ListModelsRequest(limit=10)
    with pytest.raises(grpc.RpcError) as refused:
        raw_call(conn.management.ListModels, request, ts.client.key("inference"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    models = grpc_client.list_models(conn)
    assert {"digits", "stream_words"} <= {m["modelName"] for m in models}
    assert grpc_client.list_models(conn, page_size=1) == models  # page by page
    description = grpc_client.describe_model(conn, "digits", customized=True)[0]
    assert description["batchSize"] == catalog.model("digits").serving["batchSize"]
    assert description["workers"][0]["status"] == "READY"
    meta = description["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta["meta"]["heldout_accuracy"] >= 0.97
    with pytest.raises(grpc_client.GrpcError) as missing:
        grpc_client.describe_model(conn, "no_such_model")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.integration
def test_command_line(server, digit_pngs, tmp_path, capsys):
    ts, _ = server
    common = ["--config", ts.config_path, "--home", ts.cwd]
    png, label = digit_pngs[0]
    good, bad, words = tmp_path / "digit.png", tmp_path / "truncated.png", tmp_path / "words.txt"
    good.write_bytes(png)
    bad.write_bytes(png[:len(png) - 20])
    words.write_text("alpha beta")

    assert grpc_client.main(common + ["ping"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "Healthy"}
    assert grpc_client.main(common + ["predict", "digits", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] == label
    assert grpc_client.main(common + ["stream", "stream_words", str(words)]) == 0
    assert capsys.readouterr().out.split() == ["alpha", "beta"]
    assert grpc_client.main(common + ["describe", "digits"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["modelName"] == "digits"

    assert grpc_client.main(common + ["predict", "digits", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "PNG image could not be decoded" in err


@pytest.mark.integration
def test_stream_predictions_of_a_handler_that_does_not_stream(server, digit_pngs):
    ts, conn = server
    # A copy of digits, so that the worker restart this test can cause touches no other test.
    grpc_client.register_model(conn, "digits.mar", model_name="digits_stream", initial_workers=1,
                               synchronous=True)
    try:
        png = digit_pngs[0][0]
        worker = grpc_client.describe_model(conn, "digits_stream")[0]["workers"][0]["pid"]
        answers = list(grpc_client.stream_predict(conn, "digits_stream", png))
        assert len(answers) == 1
        assert_answers_close(answers[0], ts.client.predict("digits_stream", png), "stream vs HTTP")
        assert grpc_client.describe_model(conn, "digits_stream")[0]["workers"][0]["pid"] == worker
    finally:
        grpc_client.unregister_model(conn, "digits_stream")
