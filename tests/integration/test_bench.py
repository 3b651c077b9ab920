"""make bench's (scripts/bench/) text and tabular rows: what it plans, how it feeds the handlers, its load
generator (wrk through scripts/bench/loadgen.py: its output, its own CPU use), the echo ceiling's handler,
and one real run of text and tabular rows in-process and served (a real TorchServe on free
127.0.0.1 ports, loaded by wrk)."""
import argparse
import io
import json
import os
import struct
import sys
import zipfile

import numpy as np
import pytest

from scripts.bench import cli, measure, plan, report, served
from models.catalog import FAMILIES
from scripts.bench import loadgen
from tests.answers import summaries_close
from tests.ts_harness import infer, load_service


def test_text_family_alone_plans_the_minilm_archives_without_the_foundation(catalog):
    tables = plan.plan_variant_tables(catalog, cli.variant_names(catalog), [], ["text"])
    assert [t.base.mar_name for t in tables] == ["minilm.mar"]
    rows = tables[0].rows
    assert [r.entry.mar_name for r in rows] == ["minilm.mar", "minilm_bf16.mar", "minilm_int8.mar"]
    assert plan.in_process_plan(catalog.model(measure.MODEL), [], tables) == \
        [(r.in_process_key, r.entry) for r in rows]
    inputs = {"minilm": measure.load_sentences()}
    served_variants = plan.served_plan(catalog.model(measure.MODEL), [], tables, inputs)
    assert [v.key for v in served_variants] == ["minilm served", "minilm_bf16 served", "minilm_int8 served"]
    assert {(v.content_type, v.unit) for v in served_variants} == {("text/plain; charset=utf-8", "texts")}


def test_every_row_key_is_unique_and_other_versions_get_no_row(catalog):
    """digits 1.0 and 2.0 share a name: keys go by archive, and 2.0 is not a variant of 1.0."""
    tables = plan.plan_variant_tables(catalog, cli.variant_names(catalog), ["a", "b"],
                                       list(FAMILIES))
    keys = [k for t in tables for r in t.rows for k in (r.in_process_key, r.served_key)]
    assert len(keys) == len(set(keys))
    archives = [r.entry.mar_name for t in tables for r in t.rows]
    assert "digits.mar" in archives and "digits_v2.0.mar" not in archives
    assert keys[:2] == ["a", "b"]  # the fp32 ResNet-18 row is the foundation's, measured once


def _frame(content_type: str, body: bytes) -> io.BytesIO:
    """One input of TorchServe's frontend-to-worker message (name, content type, value)."""
    parts = [b"body", content_type.encode(), body]
    return io.BytesIO(b"".join(struct.pack("!i", len(p)) + p for p in parts))


class _Conn:
    def __init__(self, stream):
        self.recv = stream.read


@pytest.mark.parametrize("content_type, body", [
    ("application/json", b"[54.0, 2.0, 36.1]"),
    ("text/plain; charset=utf-8", "Caf\u00e9 au lait.".encode()),
    ("application/octet-stream", b"\x89PNG\r\n"),
])
def test_in_process_bodies_are_decoded_as_the_worker_decodes_them(content_type, body):
    from ts.protocol.otf_message_handler import _retrieve_input_data
    worker = _retrieve_input_data(_Conn(_frame(content_type, body)))["value"]
    ours = measure.worker_value(body, content_type)
    assert ours == worker and type(ours) in (type(worker), bytes)


def test_tabular_inputs_are_the_held_out_rows_as_json():
    from models.tabular import diabetes_split
    _, _, x_test, _, names = diabetes_split()
    bodies = measure.load_diabetes_rows()
    rows = np.asarray([json.loads(b) for b in bodies.values()], dtype=np.float32)
    assert rows.shape == (len(x_test), len(names))
    assert np.array_equal(rows, x_test)


def test_answer_summaries_tell_families_apart():
    assert measure.answer_summary({"embeddings": [[0.5, -0.25, 0.125, 1.0]], "dimension": 4}) == \
        "4-d [0.5000, -0.2500, 0.1250, ...]"
    assert measure.answer_summary({"predictions": [151.234], "model_version": "1.0"}) == "151.23"
    assert measure.answer_summary([{"label": "vacuum", "index": 882}]) == "vacuum"
    assert measure.answer_summary({"code": 400, "type": "BadInput"}).startswith("unexpected answer")


def test_fidelity_cells_for_text_and_tabular():
    text = {"metric": "embedding", "min_cosine": 0.96033, "mean_cosine": 0.97561, "pair_order": 1.0,
            "lossy": True}
    assert report.fidelity_cell("embedding", text) == "0.96033, 0.97561, 1.00 (lossy)"
    assert report.fidelity_cell("embedding", {"reference": True}) == "reference"
    assert report.fidelity_cell("regression", {"reference": True, "r2": 0.4512}) == "0.4512 (reference)"
    assert report.fidelity_cell("regression", {"r2": 0.45, "r2_drop": 0.0012}) == "0.4500 (drop 0.0012)"


# What scripts/bench/loadgen.lua printed, recorded from wrk 4.1.0 (Debian 12) loading a real TorchServe 0.12
# serving echo.mar (16 connections, 2 s): with the inference key, and with a wrong one.
WRK_OUTPUT_OK = """\
Running 12s test @ http://127.0.0.1:56397/predictions/echo
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.74ms    6.26ms  60.21ms   93.37%
    Req/Sec     2.70k     0.86k    4.09k    70.00%
  5393 requests in 2.00s, 1.20MB read
Requests/sec:   2690.98
Transfer/sec:    612.30KB
loadgen-result
requests 5393
duration_us 2004105
non2xx 0
socket_connect 0
socket_read 0
socket_write 0
socket_timeout 0
latency_p50_us 5202
latency_p90_us 11121
latency_p99_us 40892
latency_mean_us 6739.1
latency_max_us 60212
first_error 
loadgen-end
"""
WRK_OUTPUT_REFUSED = """\
Running 12s test @ http://127.0.0.1:56397/predictions/echo
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.43ms    1.97ms  21.67ms   86.17%
    Req/Sec     6.23k     1.45k    8.62k    70.00%
  12450 requests in 2.01s, 5.05MB read
  Non-2xx or 3xx responses: 12450
Requests/sec:   6186.40
Transfer/sec:      2.51MB
loadgen-result
requests 12450
duration_us 2012480
non2xx 12450
status_400 12450
socket_connect 0
socket_read 0
socket_write 0
socket_timeout 0
latency_p50_us 1862
latency_p90_us 4526
latency_p99_us 10297
latency_mean_us 2434.8
latency_max_us 21670
first_error HTTP 400: { "code": 400, "type": "InvalidKeyException", "message": "Token Authorization \
failed. Token either incorrect, expired, or not provided correctly" } 
loadgen-end
"""


def test_wrk_output_becomes_a_served_measurement():
    load = loadgen.parse_output(WRK_OUTPUT_OK)
    assert (load.requests, load.ok, load.seconds) == (5393, 5393, 2.004105)
    assert load.errors == {} and load.first_error is None
    result = served.loadgen_measurement("echo ceiling", load)
    assert result.items == 5393 and result.throughput == pytest.approx(2691.0, abs=0.1)
    assert (result.percentile(50), result.percentile(99)) == (5.202, 40.892)  # microseconds -> ms
    assert result.summary()["errors"] == 0 and result.client.startswith("wrk")


def test_answers_outside_2xx_are_errors_not_items():
    load = loadgen.parse_output(WRK_OUTPUT_REFUSED)
    result = served.loadgen_measurement("echo ceiling", load)
    assert result.items == 0 and result.throughput == 0
    assert result.errors == {"HTTP 400": 12450}
    assert result.first_error.startswith('HTTP 400: { "code": 400, "type": "InvalidKeyException"')
    socket = loadgen.parse_output(WRK_OUTPUT_OK.replace("socket_timeout 0", "socket_timeout 3")
                                  .replace("socket_read 0", "socket_read 1"))
    assert socket.ok == 5393 and socket.errors == {"socket timeout": 3, "socket read": 1}
    assert socket.first_error == "socket read: 1, socket timeout: 3"


def test_output_without_the_result_block_is_a_failure():
    with pytest.raises(loadgen.LoadgenFailed, match="no loadgen-result block"):
        loadgen.parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_client_cpu_is_its_own_user_and_system_seconds_over_wall_seconds():
    assert loadgen.client_cores(0.3, 0.1, 2.0) == pytest.approx(0.2)
    assert loadgen.client_cores(1.0, 0.0, 0.0) == 0.0
    # A child that burns 0.3 s of CPU (whatever else the cores do meanwhile) and one that sleeps.
    busy = loadgen.run_child([sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass"])
    assert busy.returncode == 0 and busy.cpu_s >= 0.3
    assert busy.cores == pytest.approx(busy.cpu_s / busy.wall_s)
    idle = loadgen.run_child(["sleep", "0.5"])
    assert idle.wall_s >= 0.5 and idle.cpu_s < 0.1 and idle.cores < 0.2


def test_a_child_is_stopped_with_sigint_after_its_time():
    child = loadgen.run_child([sys.executable, "-c", "import time; time.sleep(30)"], stop_after_s=0.3)
    assert child.returncode != 0 and 0.3 <= child.wall_s < 10


def test_other_programs_cpu_leaves_out_the_clients():
    foreign = measure.ForeignCpu()
    foreign.start()
    quiet = foreign.cores(client_cpu_s=0.0)
    assert foreign.cores(client_cpu_s=1e6) == 0.0 <= quiet


def test_without_wrk_the_served_rows_fail_naming_the_install_command(catalog, monkeypatch, tmp_path):
    monkeypatch.delenv("WRK", raising=False)
    monkeypatch.setattr(loadgen.shutil, "which", lambda name: None)
    echo_only = [served.echo_variant({"row": b"[1.0]"})]
    args = argparse.Namespace(client="wrk", concurrency=4, warmup=0.0, seconds=1.0)
    (result,) = served.run_served(catalog.model(measure.MODEL), catalog, echo_only, args, str(tmp_path))
    assert result.variant == "echo ceiling" and "apt-get install -y wrk" in result.failure
    assert "ensure_loadgen.sh" in result.failure
    assert not os.listdir(tmp_path)  # no server started, no archive built


def test_models_narrow_the_tables_and_clients_are_named(catalog):
    args = cli.parse_args(["--families", "image", "--models", "digits"], cli.variant_names(catalog))
    assert args.models == ["digits"] and args.client == "wrk" and not args.skip_echo
    with pytest.raises(SystemExit):
        cli.parse_args(["--models", "resnet18"], cli.variant_names(catalog))
    with pytest.raises(SystemExit):
        cli.parse_args(["--client", "hey"], cli.variant_names(catalog))


def test_the_load_generator_drives_loopback_only():
    loadgen.check_loopback("http://127.0.0.1:8080/predictions/echo")
    with pytest.raises(ValueError, match="loopback"):
        loadgen.check_loopback("http://10.0.0.5:8080/predictions/echo")


def test_the_echo_archive_answers_a_constant_in_process(tmp_path):
    mar = served.build_echo_archive(str(tmp_path / "store"), str(tmp_path))
    with zipfile.ZipFile(mar) as archive:
        assert sorted(archive.namelist()) == ["MAR-INF/MANIFEST.json", "echo_handler.py"]  # no model
        archive.extractall(tmp_path / "echo")
    service = load_service(str(tmp_path / "echo"), batch_size=8)
    requests = [("body", "application/json", b"[1.0, 2.0]"), ("body", "text/plain", b"hello"),
                ("body", "application/octet-stream", b"\x89PNG")]
    assert infer(service, requests) == [(200, "ok")] * 3
    assert measure.answer_summary("ok") == "ok"


def test_served_rows_are_compared_with_the_lower_of_echo_and_in_process():
    echo = measure.Measurement("echo ceiling", items=3000, seconds=1.0)
    fast = measure.Measurement("diabetes in-process", items=40000, seconds=1.0)
    slow = measure.Measurement("minilm in-process", items=200, seconds=1.0)
    assert report.ceiling(fast, echo) == (3000.0, "echo")
    assert report.ceiling(slow, echo) == (200.0, "in-process")
    assert report.ceiling(slow, None) == (200.0, "in-process")
    assert report.ceiling(None, measure.Measurement("echo ceiling", failure="no wrk")) == (None, None)


@pytest.mark.integration
def test_text_and_tabular_rows_in_process_and_served(tmp_path, monkeypatch):
    """The whole benchmark for the int8 text and tabular archives with tiny windows, the served
    rows (and the echo ceiling) loaded by wrk: every row measured without errors, the served
    answers equal the in-process ones, and the results written as for the image rows."""
    try:
        loadgen.find_wrk()
    except loadgen.LoadgenMissing as exc:  # make test installs it (scripts/ensure_loadgen.sh) where it can
        pytest.skip(f"no load generator here: {exc}")
    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path))  # write_results writes there
    monkeypatch.setattr(cli, "RESULTS_DIR", str(tmp_path))
    code = cli.main(["--families", "text,tabular", "--variants", "int8", "--seconds", "2",
                       "--in-process-seconds", "1", "--warmup", "0.5", "--concurrency", "4"])
    assert code == 0
    with open(tmp_path / "latest.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["variants"] == {} and set(results["archive_variants"]) == {"minilm", "diabetes"}
    expected = {"minilm": ("minilm_int8.mar", "texts", measure.load_sentences()),
                "diabetes": ("diabetes_int8.mar", "rows", measure.load_diabetes_rows())}
    for model, (archive, unit, inputs) in expected.items():
        (row,) = results["archive_variants"][model]
        assert row["archive"] == archive and row["runtime"] == "eager, dynamic_int8"
        in_process, served_row = row["in_process"], row["served"]
        assert in_process["items_ok"] > 0 and served_row["items_ok"] > 0 and served_row["errors"] == 0
        assert served_row["unit"] == unit and "throughput_img_s" not in served_row
        assert served_row["requests_s"] == served_row["throughput_items_s"]
        assert served_row["settings"]["batch_size"] == 8
        assert served_row["client"].startswith("wrk") and 0 <= served_row["client_cpu_cores"] < 1
        assert row["served_over_ceiling"] > 0 and row["ceiling"] in ("echo", "in-process")
        assert len(served_row["answers"]) == len(inputs)
        # one input at a time both ways, but other threads/kernels: printed summaries may differ
        # in their last printed decimal (tests/answers.py)
        assert set(served_row["answers"]) == set(in_process["answers"])
        for name, summary in served_row["answers"].items():
            assert summaries_close(summary, in_process["answers"][name]), (name, summary)
    table = (tmp_path / "latest.md").read_text(encoding="utf-8")
    assert "| int8 (eager, dynamic_int8) |" in table
    assert "served texts/s" in table and "served rows/s" in table
    assert "(a) in-process pipeline" not in table  # no foundation rows were asked for
    echo = results["echo_ceiling"]
    assert echo["items_ok"] > 0 and echo["errors"] == 0 and echo["client"].startswith("wrk")
    assert echo["settings"]["batch_size"] == 8 and echo["settings"]["max_batch_delay_ms"] == 5
    assert set(echo["answers"].values()) == {"ok"}
    assert "Echo ceiling (TorchServe's per-request ceiling on this machine)" in table
    assert "CPU cores used by the client (wrk) while measuring" in table
