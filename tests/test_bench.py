"""scripts/bench.py's text and tabular rows: what it plans, how it feeds the handlers, and one real
run of a text row in-process and served (a real TorchServe on free 127.0.0.1 ports)."""
import io
import json
import struct

import numpy as np
import pytest

from answers import summaries_close
from scripts import bench


def test_text_family_alone_plans_the_minilm_archives_without_the_foundation(catalog):
    tables = bench.plan_variant_tables(catalog, bench.variant_names(catalog), [], ["text"])
    assert [t.base.mar_name for t in tables] == ["minilm.mar"]
    rows = tables[0].rows
    assert [r.entry.mar_name for r in rows] == ["minilm.mar", "minilm_bf16.mar", "minilm_int8.mar"]
    assert bench.in_process_plan(catalog.model(bench.MODEL), [], tables) == \
        [(r.in_process_key, r.entry) for r in rows]
    inputs = {"minilm": bench.load_sentences()}
    served = bench.served_plan(catalog.model(bench.MODEL), [], tables, inputs)
    assert [v.key for v in served] == ["minilm served", "minilm_bf16 served", "minilm_int8 served"]
    assert {(v.content_type, v.unit) for v in served} == {("text/plain; charset=utf-8", "texts")}


def test_every_row_key_is_unique_and_other_versions_get_no_row(catalog):
    """digits 1.0 and 2.0 share a name: keys go by archive, and 2.0 is not a variant of 1.0."""
    tables = bench.plan_variant_tables(catalog, bench.variant_names(catalog), ["a", "b"],
                                       list(bench.FAMILIES))
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
    ours = bench.worker_value(body, content_type)
    assert ours == worker and type(ours) in (type(worker), bytes)


def test_tabular_inputs_are_the_held_out_rows_as_json():
    from models.tabular import diabetes_split
    _, _, x_test, _, names = diabetes_split()
    bodies = bench.load_diabetes_rows()
    rows = np.asarray([json.loads(b) for b in bodies.values()], dtype=np.float32)
    assert rows.shape == (len(x_test), len(names))
    assert np.array_equal(rows, x_test)


def test_answer_summaries_tell_families_apart():
    assert bench.answer_summary({"embeddings": [[0.5, -0.25, 0.125, 1.0]], "dimension": 4}) == \
        "4-d [0.5000, -0.2500, 0.1250, ...]"
    assert bench.answer_summary({"predictions": [151.234], "model_version": "1.0"}) == "151.23"
    assert bench.answer_summary([{"label": "vacuum", "index": 882}]) == "vacuum"
    assert bench.answer_summary({"code": 400, "type": "BadInput"}).startswith("unexpected answer")


def test_fidelity_cells_for_text_and_tabular():
    text = {"metric": "embedding", "min_cosine": 0.96033, "mean_cosine": 0.97561, "pair_order": 1.0,
            "lossy": True}
    assert bench.fidelity_cell("embedding", text) == "0.96033, 0.97561, 1.00 (lossy)"
    assert bench.fidelity_cell("embedding", {"reference": True}) == "reference"
    assert bench.fidelity_cell("regression", {"reference": True, "r2": 0.4512}) == "0.4512 (reference)"
    assert bench.fidelity_cell("regression", {"r2": 0.45, "r2_drop": 0.0012}) == "0.4500 (drop 0.0012)"


@pytest.mark.integration
def test_text_and_tabular_rows_in_process_and_served(tmp_path, monkeypatch):
    """The whole benchmark for the int8 text and tabular archives with tiny windows: every row
    measured without errors, the served answers equal the in-process ones, and the results
    written as for the image rows."""
    monkeypatch.setattr(bench, "RESULTS_DIR", str(tmp_path))
    code = bench.main(["--families", "text,tabular", "--variants", "int8", "--seconds", "2",
                       "--in-process-seconds", "1", "--warmup", "0.5", "--concurrency", "4"])
    assert code == 0
    with open(tmp_path / "latest.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["variants"] == {} and set(results["archive_variants"]) == {"minilm", "diabetes"}
    expected = {"minilm": ("minilm_int8.mar", "texts", bench.load_sentences()),
                "diabetes": ("diabetes_int8.mar", "rows", bench.load_diabetes_rows())}
    for model, (archive, unit, inputs) in expected.items():
        (row,) = results["archive_variants"][model]
        assert row["archive"] == archive and row["runtime"] == "eager, dynamic_int8"
        in_process, served = row["in_process"], row["served"]
        assert in_process["items_ok"] > 0 and served["items_ok"] > 0 and served["errors"] == 0
        assert served["unit"] == unit and "throughput_img_s" not in served
        assert served["requests_s"] == served["throughput_items_s"]
        assert served["settings"]["batch_size"] == 8
        assert len(served["answers"]) == len(inputs)
        # one input at a time both ways, but other threads/kernels: printed summaries may differ
        # in their last printed decimal (tests/answers.py)
        assert set(served["answers"]) == set(in_process["answers"])
        for name, summary in served["answers"].items():
            assert summaries_close(summary, in_process["answers"][name]), (name, summary)
    table = (tmp_path / "latest.md").read_text(encoding="utf-8")
    assert "| int8 (eager, dynamic_int8) |" in table
    assert "served texts/s" in table and "served rows/s" in table
    assert "(a) in-process pipeline" not in table  # no foundation rows were asked for
