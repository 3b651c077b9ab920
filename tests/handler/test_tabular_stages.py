"""Tabular-regression stages (handler_kit.tabular, tabular_config), the diabetes builder
(models/tabular.py) and the tabular-regressor handler, run in-process through TorchServe's own model
loader and request reader, on a SimpleModel trained on scikit-learn's diabetes set."""
import copy
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from handler_kit import tabular
from handler_kit.errors import BadInput, ConfigError, PayloadTooLarge
from handler_kit.tabular_config import parse_tabular_regressor
from models import tabular as diabetes
from models.tabular_model import SimpleModel
from tests.ts_harness import infer, load_service

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JSON, TEXT, BINARY = "application/json", "text/plain", "application/octet-stream"
BATCH, MAX_ROWS = 8, 128
# Not the manifest's modelVersion ("1.0"): responses must carry the checkpoint's own version.
CHECKPOINT_VERSION = "2024.06-test"
MODEL_SECTION = {"module": "tabular_model", "factory": "SimpleModel",
                 "kwargs": {"in_features": 10, "hidden": 5}}
NAMES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
ROW = [59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]  # first row of the data set
OBJECT_ROW = dict(zip(NAMES, ROW))


# ---------------------------------------------------------------------------------------------
# the trained model and an archive folder, as TorchServe unpacks it for a worker


@pytest.fixture(scope="module")
def trained():
    """(checkpoint, meta) from the builder, exactly as the build produces them."""
    return diabetes.diabetes_simple_model(seed=0, model={**MODEL_SECTION, "module": "models.tabular_model"},
                                          version=CHECKPOINT_VERSION)


@pytest.fixture(scope="module")
def split():
    return diabetes.diabetes_split()


def plain_model(checkpoint) -> torch.nn.Module:
    model = SimpleModel(**MODEL_SECTION["kwargs"])
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()


def handler_section(**runtime) -> dict:
    return {"model": {**copy.deepcopy(MODEL_SECTION), "weights": "weights.pt"}, "max_rows": MAX_ROWS,
            "runtime": {"device": "cpu", "quantization": "none", "threads": 1, **runtime},
            "meta": {"name": "diabetes", "heldout_r2": 0.35}}


def build_model_folder(folder, handler: dict, checkpoint) -> str:
    os.makedirs(os.path.join(folder, "MAR-INF"))
    shutil.copy(os.path.join(ROOT, "handlers", "tabular_regressor.py"), folder)
    shutil.copytree(os.path.join(ROOT, "handlers", "handler_kit"), os.path.join(folder, "handler_kit"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "models", "tabular_model.py"), folder)
    torch.save(checkpoint, os.path.join(folder, "weights.pt"))
    manifest = {"model": {"modelName": "diabetes", "handler": "tabular_regressor.py",
                          "configFile": "model-config.yaml", "modelVersion": "1.0"}, "runtime": "python"}
    with open(os.path.join(folder, "MAR-INF", "MANIFEST.json"), "w") as f:
        json.dump(manifest, f)
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": BATCH, "maxBatchDelay": 5,
              "responseTimeout": 30, "handler": handler}
    with open(os.path.join(folder, "model-config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return str(folder)


@pytest.fixture(scope="module")
def services(tmp_path_factory, trained):
    """Loaded services by variant, each built once and only when a test asks for it."""
    loaded = {}
    variants = {"fp32": {}, "int8": {"quantization": "dynamic_int8"}}

    def get(name):
        if name not in loaded:
            folder = build_model_folder(tmp_path_factory.mktemp(f"diabetes-{name}"),
                                        handler_section(**variants[name]), trained[0])
            loaded[name] = load_service(folder, batch_size=BATCH)
        return loaded[name]
    return get


def served_predictions(service, rows) -> np.ndarray:
    [(status, body)] = infer(service, [("body", JSON, json.dumps({"inputs": rows.tolist()}).encode())])
    assert status == 200, body
    return np.asarray(body["predictions"])


# ---------------------------------------------------------------------------------------------
# configuration


def test_config_defaults_and_values():
    config = parse_tabular_regressor({"model": {**MODEL_SECTION, "weights": "weights.pt"}})
    assert config.max_rows == 1024 and config.meta == {}
    assert (config.runtime.device, config.runtime.quantization, config.runtime.threads) == ("auto", "none", None)
    assert config.model.kwargs == {"in_features": 10, "hidden": 5} and config.model.weights == "weights.pt"
    config = parse_tabular_regressor(handler_section(quantization="dynamic_int8", threads=2))
    assert config.max_rows == MAX_ROWS and config.runtime.threads == 2
    assert config.runtime.quantization == "dynamic_int8"


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["runtime"].update(quantization="int4"),
     "'handler.runtime.quantization' is 'int4'; allowed values: none, dynamic_int8"),
    (lambda h: h["runtime"].update(quantization="dynamic_int8", device="cuda"), "runs on CPU only"),
    (lambda h: h["runtime"].update(device="gpu"),
     "'handler.runtime.device' is 'gpu'; allowed values: auto, cpu, cuda"),
    (lambda h: h["runtime"].update(threads=0), "'handler.runtime.threads' must be a positive integer"),
    (lambda h: h["runtime"].update(dtype="bfloat16"), "unknown key 'handler.runtime.dtype'"),
    (lambda h: h.update(max_rows=0), "'handler.max_rows' must be a positive integer"),
    (lambda h: h.update(max_rows=True), "'handler.max_rows' must be a positive integer"),
    (lambda h: h.update(labels="labels.json"), "unknown key 'handler.labels'"),
    (lambda h: h["model"].pop("weights"), "'handler.model.weights' is missing"),
    (lambda h: h["model"].pop("factory"), "'handler.model.factory' is missing"),
    (lambda h: h["model"].update(kwargs=[10, 5]), "'handler.model.kwargs' must be a mapping"),
    (lambda h: h["model"].update(format="onnx"), "unknown key 'handler.model.format'"),
    (lambda h: h.update(meta="v1"), "'handler.meta' must be a mapping"),
    (lambda h: h.pop("model"), "'handler.model' is missing"),
])
def test_config_errors_name_the_key(edit, message):
    section = handler_section()
    edit(section)
    with pytest.raises(ConfigError) as error:
        parse_tabular_regressor(section)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------
# the builder


def test_diabetes_split_is_the_raw_data_set_in_float32(split):
    x_train, y_train, x_test, y_test, names = split
    assert x_train.shape == (353, 10) and x_test.shape == (89, 10) and names == list(NAMES)
    assert x_train.dtype == y_train.dtype == x_test.dtype == np.float32
    assert set(np.unique(x_train[:, 1])) == {1.0, 2.0}  # sex as recorded, not pre-scaled
    both = np.concatenate([x_train, x_test])
    assert np.isclose(both, np.asarray(ROW, np.float32)).all(axis=1).sum() == 1


def test_builder_is_deterministic_and_leaves_threads_and_random_state_alone(trained):
    checkpoint, meta = trained
    torch.set_num_threads(2)
    rng_before = torch.get_rng_state()
    again, meta_again = diabetes.diabetes_simple_model(
        seed=0, model={**MODEL_SECTION, "module": "models.tabular_model"}, version=CHECKPOINT_VERSION)
    assert torch.get_num_threads() == 2 and torch.equal(torch.get_rng_state(), rng_before)
    first, second = checkpoint["model_state_dict"], again["model_state_dict"]
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit-identical
    assert again["preprocess_params"] == checkpoint["preprocess_params"] and meta_again == meta
    other, _ = diabetes.diabetes_simple_model(seed=1, model={**MODEL_SECTION, "module": "models.tabular_model"})
    assert not torch.equal(other["model_state_dict"]["layers.0.weight"], first["layers.0.weight"])


def test_builder_figures_are_the_held_out_figures_of_its_weights(trained, split):
    checkpoint, meta = trained
    _, y_train, x_test, y_test, names = split
    params = checkpoint["preprocess_params"]
    assert params["feature_names"] == names and len(params["mean"]) == len(params["std"]) == 10
    assert params["target_mean"] == pytest.approx(float(y_train.mean()), rel=1e-6)
    predicted = diabetes.predictions_in_target_units(plain_model(checkpoint), x_test, params)
    print(f"\nheld-out R^2 {meta['heldout_r2']}, MAE {meta['heldout_mae']} "
          f"(ordinary least squares on the same split: R^2 {meta['linear_regression_r2']})")
    assert meta["heldout_r2"] == round(diabetes.r2_score(y_test, predicted), 4)
    assert meta["heldout_mae"] == round(diabetes.mean_absolute_error(y_test, predicted), 2)
    assert meta["heldout_r2"] >= 0.3 and meta["heldout_mae"] < 50  # predicting the mean: R^2 0, MAE ~64
    assert meta["trained"] is True and meta["heldout_samples"] == 89 and "diabetes" in meta["weights"]


def test_checkpoint_loads_as_plain_data(trained):
    buffer = io.BytesIO()
    torch.save(trained[0], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert set(loaded) == {"model_state_dict", "preprocess_params", "version"}
    assert loaded["version"] == CHECKPOINT_VERSION


def test_builder_refuses_weights_below_the_r2_floor():
    with pytest.raises(RuntimeError) as error:
        diabetes.diabetes_simple_model(seed=0, model={**MODEL_SECTION, "module": "models.tabular_model"},
                                       epochs=1, min_r2=0.3)
    assert "below min_r2 0.3" in str(error.value)


# ---------------------------------------------------------------------------------------------
# the checkpoint and the model


def save(checkpoint, tmp_path) -> str:
    path = str(tmp_path / "weights.pt")
    torch.save(checkpoint, path)
    return path


def test_load_checkpoint_gives_weights_preprocessing_and_version(trained, tmp_path):
    state_dict, params, version = tabular.load_checkpoint(save(trained[0], tmp_path), torch.device("cpu"))
    assert version == CHECKPOINT_VERSION and params.feature_names == NAMES
    assert params.mean.dtype == params.std.dtype == np.float32
    assert np.allclose(params.std, trained[0]["preprocess_params"]["std"])
    assert set(state_dict) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}


class NotPlainData:
    pass


def with_params(checkpoint, **changes) -> dict:
    return {**checkpoint, "preprocess_params": {**checkpoint["preprocess_params"], **changes}}


@pytest.mark.parametrize("edit, message", [
    (lambda c: {k: v for k, v in c.items() if k != "version"}, "lacks 'version'"),
    (lambda c: {k: v for k, v in c.items() if k != "preprocess_params"}, "lacks 'preprocess_params'"),
    (lambda c: c["model_state_dict"], "lacks 'model_state_dict'"),
    (lambda c: {**c, "version": 1.0}, "'version' must be a non-empty string"),
    (lambda c: with_params(c, mean=[0.0] * 9), "'preprocess_params.mean' must be a list of 10 numbers"),
    (lambda c: with_params(c, std=[1.0] * 11), "'preprocess_params.std' must be a list of 10 numbers"),
    (lambda c: with_params(c, std=[1.0] * 9 + [0.0]), "'preprocess_params.std' must be > 0 for every "
                                                      "feature; it is not for s6"),
    (lambda c: with_params(c, mean=[0.0] * 9 + [float("nan")]), "'preprocess_params.mean' holds a value"),
    (lambda c: with_params(c, target_std=0.0), "'preprocess_params.target_std' must be > 0"),
    (lambda c: with_params(c, feature_names=["age"] * 10), "repeats a name"),
    (lambda c: {**c, "preprocess_params": {"feature_names": list(NAMES)}},
     "'preprocess_params.mean' is missing"),
    (lambda c: {**c, "preprocess_params": NotPlainData()}, "refusing to load weights.pt"),
])
def test_load_checkpoint_refuses_a_bad_checkpoint_naming_the_key(trained, tmp_path, edit, message):
    with pytest.raises(ConfigError) as error:
        tabular.load_checkpoint(save(edit(trained[0]), tmp_path), torch.device("cpu"))
    assert message in str(error.value)


def test_load_checkpoint_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="weights.pt is missing from the archive"):
        tabular.load_checkpoint(str(tmp_path / "weights.pt"), torch.device("cpu"))


def test_build_model_loads_the_weights_strictly(trained):
    state_dict = trained[0]["model_state_dict"]
    model = tabular.build_model("models.tabular_model", "SimpleModel", {"in_features": 10}, state_dict,
                                torch.device("cpu"))
    assert not model.training and torch.equal(model.layers[0].weight, state_dict["layers.0.weight"])
    tabular.check_model_fits(model, 10, torch.device("cpu"))
    with pytest.raises(ConfigError) as error:
        tabular.build_model("models.tabular_model", "SimpleModel", {"hidden": 6}, state_dict,
                            torch.device("cpu"))
    assert "does not fit models.tabular_model.SimpleModel(hidden=6)" in str(error.value)
    assert "size mismatch for layers.0.weight" in str(error.value)
    with pytest.raises(ConfigError, match="cannot import models.tabular_model.Nothing"):
        tabular.build_model("models.tabular_model", "Nothing", {}, state_dict, torch.device("cpu"))


def test_a_model_that_does_not_take_the_features_is_refused_at_load():
    with pytest.raises(ConfigError, match="does not take the checkpoint's 9 features"):
        tabular.check_model_fits(SimpleModel(in_features=10).eval(), 9, torch.device("cpu"))
    with pytest.raises(ConfigError, match="one value per row, got shape"):
        tabular.check_model_fits(torch.nn.Linear(10, 3), 10, torch.device("cpu"))


def test_load_regressor_predicts_in_target_units_and_refuses_int8_on_a_gpu(trained, split, tmp_path):
    path = save(trained[0], tmp_path)
    spec = dataclasses.replace(parse_tabular_regressor(handler_section()).model, module="models.tabular_model")
    x_test = split[2]
    regressor = tabular.load_regressor(path, spec, torch.device("cpu"))
    expected = diabetes.predictions_in_target_units(plain_model(trained[0]), x_test,
                                                    trained[0]["preprocess_params"])
    assert regressor.version == CHECKPOINT_VERSION and regressor.params.feature_names == NAMES
    assert np.allclose(regressor.predict_rows(x_test), expected, rtol=0, atol=1e-3)
    quantized = tabular.load_regressor(path, spec, torch.device("cpu"), quantization="dynamic_int8")
    assert isinstance(quantized.model.layers[0], torch.ao.nn.quantized.dynamic.Linear)
    assert np.abs(quantized.predict_rows(x_test) - expected).max() > 0  # really quantized
    with pytest.raises(ConfigError, match="dynamic_int8 runs on CPU only, but the worker was given cuda:0"):
        tabular.load_regressor(path, spec, torch.device("cuda:0"), quantization="dynamic_int8")


# ---------------------------------------------------------------------------------------------
# request -> rows


@pytest.mark.parametrize("request_, rows", [
    ({"body": ROW}, [ROW]),
    ({"body": OBJECT_ROW}, [ROW]),
    ({"body": [ROW, ROW[::-1]]}, [ROW, ROW[::-1]]),
    ({"body": [OBJECT_ROW, ROW]}, [ROW, ROW]),                        # objects and lists mixed
    ({"body": {"inputs": [OBJECT_ROW, ROW]}}, [ROW, ROW]),
    ({"body": {"inputs": ROW}}, [ROW]),
    ({"body": json.dumps([ROW]).encode()}, [ROW]),                    # JSON sent as octet-stream
    ({"body": json.dumps({"inputs": [OBJECT_ROW]})}, [ROW]),           # JSON sent as text/plain
    ({"data": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]}, [list(range(1, 11))]),  # integers are numbers
    ({"inputs": json.dumps([ROW]).encode()}, [ROW]),                  # a multipart field
])
def test_rows_of_accepts_every_row_format(request_, rows):
    array = tabular.rows_of(request_, NAMES, max_rows=4)
    assert array.dtype == np.float32 and array.shape == (len(rows), 10)
    assert np.array_equal(array, np.asarray(rows, np.float32))


def row_with(index: int, value) -> list:
    row = list(ROW)
    row[index] = value
    return row


@pytest.mark.parametrize("request_, message", [
    ({"body": ROW[:9]}, "row 0 has 9 values; expected 10 (age, sex, bmi, bp, s1, s2, s3, s4, s5, s6)"),
    ({"body": [ROW, ROW + [1.0]]}, "row 1 has 11 values; expected 10"),
    ({"body": [ROW, row_with(2, float("nan"))]}, "row 1, feature 'bmi': NaN is not allowed"),
    ({"body": json.dumps([row_with(3, float("nan"))]).encode()}, "row 0, feature 'bp': NaN is not allowed"),
    ({"body": [row_with(0, float("inf"))]}, "row 0, feature 'age': Infinity is not allowed"),
    ({"body": [row_with(9, float("-inf"))]}, "row 0, feature 's6': -Infinity is not allowed"),
    ({"body": [row_with(4, 1e39)]}, "row 0, feature 's1': a value beyond the float32 range"),
    ({"body": [row_with(4, 10 ** 400)]}, "row 0, feature 's1': a value beyond the float32 range"),
    ({"body": [row_with(1, "male")]}, "row 0, feature 'sex': expected a number, got string 'male'"),
    ({"body": [row_with(1, "2")]}, "row 0, feature 'sex': expected a number, got string '2'"),
    ({"body": [ROW, row_with(5, None)]}, "row 1, feature 's2': expected a number, got null"),
    ({"body": [row_with(1, True)]}, "row 0, feature 'sex': expected a number, got boolean true"),
    ({"body": [row_with(1, [2])]}, "row 0, feature 'sex': expected a number, got a list"),
    ({"body": {**OBJECT_ROW, "bmi": None}}, "row 0, feature 'bmi': expected a number, got null"),
    ({"body": {k: v for k, v in OBJECT_ROW.items() if k not in ("s5", "s6")}},
     "row 0: missing features 's5', 's6'; every row needs all 10"),
    ({"body": [ROW, {**OBJECT_ROW, "glucose": 5.0}]}, "row 1: unknown feature 'glucose'; the features are age"),
    ({"body": [ROW, 5]}, "row 1 must be a list of 10 numbers or an object feature name -> number, got a number"),
    ({"body": []}, "no rows: the list is empty"),
    ({"body": {"inputs": []}}, "no rows: the list is empty"),
    ({"body": {"inputs": [ROW], "normalize": True}}, "must have no other keys; found: normalize"),
    ({"body": {"inputs": "59,2,32.1"}}, "'inputs' must be a list of rows, got string"),
    ({"body": 5}, "JSON body must be a row (a list of 10 numbers"),
    ({"body": b"age=59&sex=2"}, "request body is not valid JSON"),
    ({"body": b"[[59, 2, 32.1"}, "request body is not valid JSON"),
    ({"body": b"\xff\xfe[1]"}, "request body is not UTF-8 (invalid byte at position 0)"),
    ({"body": b"[" * 100_000}, "request body is not valid JSON: nested too deeply"),
    ({"body": b""}, "request body is empty"),
    ({"body": "  \n"}, "request body is empty"),
    ({}, "request has no body"),
])
def test_rows_of_refuses_bad_requests_naming_the_row_and_feature(request_, message):
    with pytest.raises(BadInput) as error:
        tabular.rows_of(request_, NAMES, max_rows=4)
    assert error.value.status == 400 and message in error.value.message


def test_more_rows_than_max_rows_is_413_naming_the_limit():
    assert tabular.rows_of({"body": [ROW] * 4}, NAMES, max_rows=4).shape == (4, 10)
    with pytest.raises(PayloadTooLarge) as error:
        tabular.rows_of({"body": {"inputs": [ROW] * 5}}, NAMES, max_rows=4)
    assert error.value.status == 413
    assert error.value.message == "5 rows in one request, above the limit of 4; split them over several requests"


# ---------------------------------------------------------------------------------------------
# rows -> predictions -> response bodies


def test_standardize_uses_the_checkpoint_mean_and_std():
    params = tabular.PreprocessParams(feature_names=("a", "b"), mean=np.array([1.0, 10.0], np.float32),
                                      std=np.array([2.0, 5.0], np.float32), target_mean=0.0, target_std=1.0)
    x = tabular.standardize(np.array([[1.0, 10.0], [5.0, 0.0]], np.float32), params)
    assert x.dtype == torch.float32 and torch.equal(x, torch.tensor([[0.0, 0.0], [2.0, -2.0]]))


def test_predict_gives_one_value_per_row_on_the_cpu(trained):
    model = plain_model(trained[0])
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    out = tabular.predict(model, x, torch.device("cpu"))
    assert out.shape == (6,) and out.dtype == torch.float32 and out.device.type == "cpu"
    with torch.no_grad():
        assert torch.allclose(out, model(x).reshape(-1))


def test_format_predictions_splits_the_batch_back_in_target_units():
    params = tabular.PreprocessParams(feature_names=("a",), mean=np.zeros(1, np.float32),
                                      std=np.ones(1, np.float32), target_mean=150.0, target_std=80.0)
    bodies = tabular.format_predictions(torch.tensor([0.0, 1.0, -0.5, 0.25]), [1, 2, 1], params, "3.1")
    assert bodies == [{"predictions": [150.0], "model_version": "3.1"},
                      {"predictions": [230.0, 110.0], "model_version": "3.1"},
                      {"predictions": [170.0], "model_version": "3.1"}]


# ---------------------------------------------------------------------------------------------
# the handler, in-process


def test_served_predictions_are_the_plain_models_on_held_out_rows(services, trained, split):
    checkpoint, meta = trained
    _, _, x_test, y_test, _ = split
    served = served_predictions(services("fp32"), x_test)
    expected = diabetes.predictions_in_target_units(plain_model(checkpoint), x_test,
                                                    checkpoint["preprocess_params"])
    assert served.shape == (89,)
    assert np.allclose(served, expected, rtol=0, atol=1e-3), np.abs(served - expected).max()
    assert diabetes.r2_score(y_test, served) == pytest.approx(meta["heldout_r2"], abs=1e-4)


def test_every_row_format_gets_the_same_answer_and_the_checkpoint_version(services):
    requests = [("body", JSON, json.dumps(ROW).encode()),
                ("body", JSON, json.dumps(OBJECT_ROW).encode()),
                ("body", JSON, json.dumps({"inputs": [OBJECT_ROW, ROW]}).encode()),
                ("body", TEXT, json.dumps([ROW]).encode()),
                ("body", BINARY, json.dumps([ROW]).encode())]
    results = infer(services("fp32"), requests)
    assert [status for status, _ in results] == [200] * 5
    assert all(body["model_version"] == CHECKPOINT_VERSION for _, body in results)
    value = results[0][1]["predictions"]
    assert len(value) == 1 and 25 <= value[0] <= 346  # the range of the data set's targets
    assert results[2][1]["predictions"] == pytest.approx(value * 2, abs=1e-3)
    for i in (1, 3, 4):
        assert results[i][1]["predictions"] == pytest.approx(value, abs=1e-3)


def test_bad_requests_fail_alone_and_the_others_get_the_same_predictions(services, split):
    service = services("fp32")
    x_test = split[2]
    good = [("body", JSON, json.dumps(x_test[:3].tolist()).encode()),
            ("body", JSON, json.dumps(dict(zip(NAMES, x_test[3].tolist()))).encode()),
            ("data", BINARY, json.dumps({"inputs": x_test[4:9].tolist()}).encode())]
    alone = [infer(service, [request])[0][1] for request in good]
    nan_row = json.dumps([ROW]).replace("32.1", "NaN").encode()  # Python's json reads NaN
    bad = [("body", JSON, nan_row),                                         # NaN
           ("body", JSON, json.dumps([ROW[:9]]).encode()),                   # 9 features
           ("body", JSON, json.dumps([row_with(1, "male")]).encode()),      # not a number
           ("body", JSON, json.dumps({"inputs": [ROW] * (MAX_ROWS + 1)}).encode()),  # too many rows
           ("body", JSON, b"\xff\xfe not utf-8"),                           # TorchServe forwards bytes
           ("body", JSON, b'{"inputs": [[59, 2'),                           # invalid JSON
           ("body", JSON, json.dumps({**OBJECT_ROW, "glucose": 1}).encode()),  # unknown name
           ("body", JSON, b"[" * 100_000)]            # TorchServe's json.loads hits the recursion limit
    mixed = infer(service, [good[0], bad[0], bad[1], good[1], bad[2], bad[3], bad[4], bad[5], good[2], bad[6],
                            bad[7]])
    assert [status for status, _ in mixed] == [200, 400, 400, 200, 400, 413, 400, 400, 200, 400, 400]
    messages = [body["message"] for status, body in mixed if status != 200]
    for expected, message in zip(["row 0, feature 'bmi': NaN", "row 0 has 9 values", "row 0, feature 'sex'",
                                  "above the limit of 128", "not UTF-8", "not valid JSON",
                                  "unknown feature 'glucose'", "nested too deeply"], messages):
        assert expected in message
    answered = [body for status, body in mixed if status == 200]
    assert [len(body["predictions"]) for body in answered] == [3, 1, 5]
    for together, by_itself in zip(answered, alone):
        assert together["predictions"] == pytest.approx(by_itself["predictions"], abs=1e-3)


def test_one_forward_pass_per_server_side_batch(services):
    handler = services("fp32")._entry_point.__self__
    calls = []
    hook = handler.regressor.model.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        infer(services("fp32"), [("body", JSON, json.dumps(ROW).encode()),
                                 ("body", JSON, json.dumps([ROW, ROW]).encode()),
                                 ("body", JSON, b"[]")])
    finally:
        hook.remove()
    assert calls == [3]


def test_dynamic_int8_stays_close_to_fp32(services, trained, split):
    _, _, x_test, y_test, _ = split
    reference = served_predictions(services("fp32"), x_test)
    reduced = served_predictions(services("int8"), x_test)
    handler = services("int8")._entry_point.__self__
    assert isinstance(handler.regressor.model.layers[0], torch.ao.nn.quantized.dynamic.Linear)
    difference = np.abs(reduced - reference)
    r2_fp32, r2_int8 = diabetes.r2_score(y_test, reference), diabetes.r2_score(y_test, reduced)
    print(f"\nint8 vs fp32 on {len(y_test)} held-out rows: max |diff| {difference.max():.3f}, "
          f"mean {difference.mean():.3f} (targets 25..346); R^2 {r2_int8:.4f} vs {r2_fp32:.4f}")
    assert 0 < difference.max() < 5.0  # it is quantized, and not by much
    assert abs(r2_int8 - r2_fp32) < 0.02


def test_describe_shows_meta_features_version_and_runtime(services):
    described = services("int8")._entry_point.__self__.describe_handle()
    assert described["meta"]["name"] == "diabetes" and described["version"] == CHECKPOINT_VERSION
    assert described["feature_names"] == list(NAMES) and described["quantization"] == "dynamic_int8"
    assert described["device"] == "cpu" and described["max_rows"] == MAX_ROWS


@pytest.mark.parametrize("edit_config, edit_checkpoint, message", [
    (lambda h: h["runtime"].update(quantization="int4"), None,
     "'handler.runtime.quantization' is 'int4'; allowed values: none, dynamic_int8"),
    (lambda h: h["model"].update(weights="model.pt"), None, "model.pt is missing from the archive"),
    (lambda h: h["model"]["kwargs"].update(hidden=8), None, "does not fit tabular_model.SimpleModel"),
    (lambda h: h["model"].update(factory="ComplexModel"), None, "cannot import tabular_model.ComplexModel"),
    (None, lambda c: with_params(c, std=[0.0] + [1.0] * 9), "'preprocess_params.std' must be > 0"),
    (None, lambda c: with_params(c, feature_names=list(NAMES[:9]), mean=[0.0] * 9, std=[1.0] * 9),
     "does not take the checkpoint's 9 features"),
])
def test_bad_configuration_fails_the_load_naming_the_key(tmp_path, trained, edit_config, edit_checkpoint,
                                                         message):
    section, checkpoint = handler_section(), trained[0]
    if edit_config:
        edit_config(section)
    if edit_checkpoint:
        checkpoint = edit_checkpoint(checkpoint)
    folder = build_model_folder(tmp_path / "diabetes", section, checkpoint)
    with pytest.raises(ConfigError) as error:
        load_service(folder, batch_size=BATCH)
    assert message in str(error.value)
