"""The profiling switch (handlers/handler_kit/profiling.py, scripts/serving/profile.py): a request file
turns torch.profiler on for a model's next N requests, the trace lands in a folder, the switch
turns itself off, and nothing about it can fail a request."""
import json
import logging
import os
import textwrap
import threading
import time
import zipfile

import pytest
import requests
import torch

from handler_kit import profiling
from handler_kit.profiling import ENV_PROFILE_DIR, Profiler, ProfileRequestError, parse_request
from scripts.serving import profile as profile_script
from scripts.serving.profile import ProfileFailed, find_result, wait_for_profile, write_request
from tests.ts_harness import infer, load_service

X = torch.randn(48, 48)


def profiled_batch(profiler: Profiler, size: int = 2):
    """One batch: a matrix product inside the profiled region, a tanh outside it."""
    with profiler.maybe_profile(size):
        result = torch.mm(X, X)
    torch.tanh(X)
    return result


def output_folders(trigger_dir, model="tiny"):
    return sorted(p for p in os.listdir(trigger_dir) if p.startswith(f"{model}-"))


def cpu_ops(trace_path) -> set:
    with open(trace_path) as f:
        return {e["name"] for e in json.load(f)["traceEvents"] if e.get("cat") == "cpu_op"}


def test_a_request_file_profiles_the_next_n_requests_then_switches_off(tmp_path):
    profiler = Profiler(str(tmp_path), "tiny")
    profiled_batch(profiler)
    assert output_folders(tmp_path) == []  # no request file: off

    tag = write_request(str(tmp_path), "tiny", requests=5)
    profiled_batch(profiler)
    profiled_batch(profiler)
    assert find_result(str(tmp_path), "tiny", tag) is None  # 4 of 5 requests: still recording
    profiled_batch(profiler)
    result = find_result(str(tmp_path), "tiny", tag)

    assert result.summary["requests"] == 6 and result.summary["batches"] == 3
    assert result.summary["top_ops"][0]["name"] == "aten::mm"
    assert result.summary["top_ops"][0]["calls"] == 3
    ops = cpu_ops(os.path.join(result.folder, "trace.json"))
    assert "aten::mm" in ops and "aten::tanh" not in ops  # collection is paused between batches
    with open(os.path.join(result.folder, "key_averages.txt")) as f:
        assert "aten::mm" in f.read()
    assert not os.path.exists(profiling.request_path(str(tmp_path), "tiny"))
    profiled_batch(profiler)
    assert output_folders(tmp_path) == [os.path.basename(result.folder)]


def test_recorded_shapes_reach_the_trace(tmp_path):
    profiler = Profiler(str(tmp_path), "tiny")
    tag = write_request(str(tmp_path), "tiny", requests=1, record_shapes=True)
    profiled_batch(profiler, size=1)
    result = find_result(str(tmp_path), "tiny", tag)
    with open(os.path.join(result.folder, "trace.json")) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "aten::mm"]
    assert events and events[0]["args"]["Input Dims"] == [[48, 48], [48, 48]]


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "Expecting property name"),
    (b'{"requests": 0}', "'requests' must be a positive integer"),
    (b'{"requests": 4, "activities": ["tpu"]}', "'activities' is ['tpu']"),
    (b'{"requests": 4, "speed": "max"}', "unknown key 'speed'"),
    (b"[4]", "must be a JSON object"),
])
def test_a_malformed_request_file_is_logged_and_ignored(tmp_path, caplog, content, reason):
    profiler = Profiler(str(tmp_path), "tiny")
    (tmp_path / "tiny.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger=profiling.__name__):
        result = profiled_batch(profiler)
    assert torch.equal(result, torch.mm(X, X))
    assert reason in caplog.text
    assert (tmp_path / "tiny.json.rejected").read_bytes() == content
    assert not (tmp_path / "tiny.json").exists() and output_folders(tmp_path) == []
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=profiling.__name__):
        profiled_batch(profiler)
    assert caplog.text == ""  # said once, not at every batch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_activity_without_a_gpu_is_rejected(tmp_path, caplog):
    (tmp_path / "tiny.json").write_text('{"requests": 1, "activities": ["cpu", "cuda"]}')
    with caplog.at_level(logging.ERROR, logger=profiling.__name__):
        profiled_batch(Profiler(str(tmp_path), "tiny"))
    assert "sees no GPU" in caplog.text and (tmp_path / "tiny.json.rejected").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
def test_cuda_kernels_of_the_profiled_batches_are_in_the_trace(tmp_path):
    profiler = Profiler(str(tmp_path), "tiny")
    on_gpu = X.cuda()
    tag = write_request(str(tmp_path), "tiny", requests=2, activities=("cpu", "cuda"))
    for _ in range(2):
        with profiler.maybe_profile(1):
            torch.mm(on_gpu, on_gpu)  # asynchronous: the switch waits for it before pausing
        torch.tanh(on_gpu)
    result = find_result(str(tmp_path), "tiny", tag)
    with open(os.path.join(result.folder, "trace.json")) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert len({e["args"]["correlation"] for e in kernels}) >= 2  # one launch per profiled batch
    assert "aten::tanh" not in {e["name"] for e in events if e.get("cat") == "cpu_op"}


@pytest.mark.parametrize("broken", ["start", "finish"])
def test_profiler_errors_never_fail_the_wrapped_call(tmp_path, monkeypatch, caplog, broken):
    def fail(*_):
        raise OSError("disk full")
    target = torch.profiler.profile if broken == "start" else profiling._Session
    monkeypatch.setattr(target, broken, fail)
    profiler = Profiler(str(tmp_path), "tiny")
    tag = write_request(str(tmp_path), "tiny", requests=2)
    with caplog.at_level(logging.ERROR, logger=profiling.__name__):
        result = profiled_batch(profiler)
    assert torch.equal(result, torch.mm(X, X))
    assert "disk full" in caplog.text
    with pytest.raises(ProfileFailed, match="disk full"):
        find_result(str(tmp_path), "tiny", tag)
    profiled_batch(profiler)  # and the switch is off again
    assert len(output_folders(tmp_path)) == 1


def test_an_error_of_the_wrapped_call_is_raised_unchanged_and_its_batch_counted(tmp_path):
    profiler = Profiler(str(tmp_path), "tiny")
    tag = write_request(str(tmp_path), "tiny", requests=3)
    with pytest.raises(ValueError, match="bad batch"):
        with profiler.maybe_profile(2):
            torch.mm(X, X)
            raise ValueError("bad batch")
    profiled_batch(profiler, size=1)
    assert find_result(str(tmp_path), "tiny", tag).summary["batches"] == 2


def test_only_one_worker_claims_a_request(tmp_path):
    first, second = Profiler(str(tmp_path), "tiny"), Profiler(str(tmp_path), "tiny")
    tag = write_request(str(tmp_path), "tiny", requests=2)
    profiled_batch(first, size=1)
    profiled_batch(second, size=1)  # finds no request file: the first worker holds it
    profiled_batch(first, size=1)
    assert find_result(str(tmp_path), "tiny", tag).summary["batches"] == 2
    assert len(output_folders(tmp_path)) == 1


def test_where_the_workers_look(tmp_path):
    assert profiling.trigger_dir_from({ENV_PROFILE_DIR: str(tmp_path)}) == str(tmp_path)
    assert profiling.trigger_dir_from({ENV_PROFILE_DIR: ""}) is None
    # outside a TorchServe worker (the parent process is not the frontend): this process's cwd
    assert profiling.trigger_dir_from({}) == os.path.join(os.getcwd(), "build", "profiles")
    off = Profiler.from_environment("tiny", {ENV_PROFILE_DIR: ""})
    assert off.request_file is None
    profiled_batch(off)
    assert profile_script.default_dir({ENV_PROFILE_DIR: str(tmp_path)}) == str(tmp_path)


def test_the_script_checks_requests_and_withdraws_one_never_claimed(tmp_path):
    with pytest.raises(ProfileRequestError, match="activities"):
        write_request(str(tmp_path), "tiny", requests=2, activities=["gpu"])
    tag = write_request(str(tmp_path), "tiny", requests=2)
    with pytest.raises(FileExistsError, match="already waiting"):
        write_request(str(tmp_path), "tiny", requests=2)
    with pytest.raises(TimeoutError, match="request withdrawn"):
        wait_for_profile(str(tmp_path), "tiny", tag, timeout_s=0)
    assert not (tmp_path / "tiny.json").exists()
    assert profile_script.main(["tiny", "--requests", "3", "--dir", str(tmp_path)]) == 0
    assert parse_request(json.loads((tmp_path / "tiny.json").read_text())).requests == 3
    assert profile_script.main(["tiny", "--requests", "0", "--dir", str(tmp_path / "other")]) == 2


def test_the_script_waits_for_the_trace_and_prints_the_top_operators(tmp_path, capsys):
    exit_codes = []
    script = threading.Thread(target=lambda: exit_codes.append(profile_script.main(
        ["tiny", "--requests", "2", "--dir", str(tmp_path), "--wait", "--timeout", "120"])))
    script.start()
    profiler = Profiler(str(tmp_path), "tiny")
    while script.is_alive():  # a worker taking batches while the script waits
        profiled_batch(profiler, size=1)
        time.sleep(0.05)
    assert exit_codes == [0]
    out = capsys.readouterr().out
    assert "2 requests in 2 batches" in out and "trace.json" in out
    assert "aten::mm" in out.split("operator", 1)[1]


TINY_HANDLER = '''
import torch
from ts.torch_handler.base_handler import BaseHandler
from handler_kit.profiling import Profiler


class TinyHandler(BaseHandler):
    def initialize(self, context):
        self.model = torch.nn.Linear(4, 2)
        self.profiler = Profiler.from_environment(context.model_name)
        self.initialized = True

    def preprocess(self, data):
        return torch.tensor([[float(len(r.get("body") or r.get("data")))] * 4 for r in data])

    def inference(self, batch, *args, **kwargs):
        with self.profiler.maybe_profile(len(batch)), torch.inference_mode():
            return self.model(batch)

    def postprocess(self, outputs):
        return outputs.argmax(1).tolist()
'''


def test_a_handler_run_by_torchserves_model_loader_is_profiled_on_request(tmp_path, monkeypatch):
    model_dir, trigger_dir = tmp_path / "tiny-model", tmp_path / "profiles"
    (model_dir / "MAR-INF").mkdir(parents=True)
    (model_dir / "tiny_handler.py").write_text(textwrap.dedent(TINY_HANDLER))
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(
        {"model": {"modelName": "tiny", "handler": "tiny_handler.py", "modelVersion": "1.0"}}))
    monkeypatch.setenv(ENV_PROFILE_DIR, str(trigger_dir))  # as TorchServe passes it to a worker
    service = load_service(str(model_dir), batch_size=4)
    batch = [("body", "application/octet-stream", b"abc")] * 3

    assert [status for status, _ in infer(service, batch)] == [200] * 3
    tag = write_request(str(trigger_dir), "tiny", requests=4)
    for _ in range(2):
        assert [status for status, _ in infer(service, batch)] == [200] * 3
    result = find_result(str(trigger_dir), "tiny", tag)
    assert result.summary["requests"] == 6 and result.summary["batches"] == 2
    assert "aten::linear" in cpu_ops(os.path.join(result.folder, "trace.json"))


# -- served: a real TorchServe, switched on while it runs -------------------------------------------
SERVED_MODEL = "digits"


def archive_profiles(mar_path: str) -> bool:
    """Whether the archive's handler calls the profiler: it is a StagedHandler, whose bundled
    base (handler_kit/serving.py) wraps every batch's forward in the profiler switch."""
    with zipfile.ZipFile(mar_path) as archive:
        handler = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["handler"]
        return ("handler_kit/profiling.py" in archive.namelist()
                and b"(StagedHandler)" in archive.read(handler.split(":")[0])
                and b"self.profiler.maybe_profile(" in archive.read("handler_kit/serving.py"))


def check_switch_without_restart(server, trigger_dir: str, model: str, bodies) -> None:
    """Profiles ``model`` on a running server from the request file to the trace; the worker
    that answered before is the one that profiled (no restart)."""
    auth = {"Authorization": f"Bearer {server.client.key('inference')}"}

    def post(body):
        response = requests.post(f"{server.inference_url}/predictions/{model}", data=body,
                                 headers=auth, timeout=120)
        assert response.status_code == 200, response.text

    post(bodies[0])
    worker_pid = server.client.describe(model)[0]["workers"][0]["pid"]
    assert not os.path.isdir(trigger_dir) or os.listdir(trigger_dir) == []

    tag = write_request(trigger_dir, model, requests=3)
    for body in bodies[1:4]:
        post(body)
    result = wait_for_profile(trigger_dir, model, tag, timeout_s=120)
    assert result.summary["requests"] >= 3 and result.summary["pid"] == worker_pid
    assert server.client.describe(model)[0]["workers"][0]["pid"] == worker_pid
    assert any(op.startswith("aten::") for op in cpu_ops(os.path.join(result.folder, "trace.json")))
    post(bodies[4])  # the switch is off again: no second profile
    assert [p for p in os.listdir(trigger_dir) if p.startswith(f"{model}-")] == [os.path.basename(result.folder)]


@pytest.mark.integration
def test_profiling_switched_on_while_torchserve_runs(catalog, model_store, samples, torchserve_factory):
    entry = catalog.model(SERVED_MODEL)
    assert archive_profiles(os.path.join(model_store, entry.mar_name)), "run `make build`"
    # ENV_PROFILE_DIR unset: the default, build/profiles where the server started
    with torchserve_factory.start("ts-profiling", models=[entry], catalog=catalog, store=model_store,
                                  ready_timeout=300, env={ENV_PROFILE_DIR: None}) as server:
        _, _, images, _ = samples.digits_split()
        bodies = [samples.png_bytes(pixels) for pixels in images[:5]]
        check_switch_without_restart(server, os.path.join(server.cwd, "build", "profiles"), entry.name, bodies)
