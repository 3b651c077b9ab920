"""The archived handlers, loaded by TorchServe's own model loader from the real archive contents,
fed requests through TorchServe's own request reader; no Java frontend."""
import base64
import os
import shutil

import pytest
import yaml

from tests.answers import PROBABILITY_ATOL, answers_close, assert_answers_close
from tests.ts_harness import infer, load_service

JPEG, PNG, JSON = "image/jpeg", "image/png", "application/json"


@pytest.fixture(scope="module")
def photo_classifier(extracted_archives):
    return load_service(extracted_archives["efficientnet_lite0"], batch_size=16)


@pytest.fixture(scope="module")
def digits(extracted_archives):
    return load_service(extracted_archives["digits"], batch_size=8)


def b64_json(data: bytes) -> bytes:
    return ('{"data": "%s"}' % base64.b64encode(data).decode()).encode()


def test_photo_top5_is_the_same_for_every_wire_format(photo_classifier, samples):
    china = samples.photo_bytes()[0]
    results = infer(photo_classifier, [("body", JPEG, china), ("data", "application/octet-stream", china),
                             ("body", JSON, b64_json(china))])
    assert [status for status, _ in results] == [200, 200, 200]
    top5 = results[0][1]
    assert len(top5) == 5 and all(set(p) == {"label", "index", "probability"} for p in top5)
    probabilities = [p["probability"] for p in top5]
    assert probabilities == sorted(probabilities, reverse=True)
    assert top5[0]["label"] in samples.PHOTO_CLASSES["china.jpg"], top5
    # three rows of one batch: the same image, so the same answer up to kernel rounding
    assert_answers_close(results[1][1], top5, "multipart")
    assert_answers_close(results[2][1], top5, "base64 JSON")


def test_digits_accuracy_matches_what_the_archive_records(digits, samples, extracted_archives):
    with open(os.path.join(extracted_archives["digits"], "model-config.yaml")) as f:
        recorded = yaml.safe_load(f)["handler"]["meta"]["heldout_accuracy"]
    _, _, images, labels = samples.digits_split()
    correct = 0
    for start in range(0, len(images), 8):
        chunk = [("body", PNG, samples.png_bytes(p)) for p in images[start:start + 8]]
        for (status, top), label in zip(infer(digits, chunk), labels[start:start + 8]):
            assert status == 200
            correct += int(top[0]["label"] == str(label))
    accuracy = correct / len(images)
    assert accuracy >= 0.97
    # served pixels == training pixels: the same accuracy, allowing one near-tie image to flip
    # where batch size or CPU capability moves the last bits (tests/answers.py)
    assert accuracy == pytest.approx(recorded, abs=1.01 / len(images))


def test_bad_request_inside_a_batch_fails_alone(digits, samples):
    _, _, images, labels = samples.digits_split()
    good = [("body", PNG, samples.png_bytes(p)) for p in images[:6]]
    alone = infer(digits, good)
    corrupt = samples.png_bytes(images[0])[:30]
    mixed = infer(digits, good[:3] + [("body", PNG, corrupt)] + good[3:] + [("body", JSON, b"{oops")])
    statuses = [status for status, _ in mixed]
    assert statuses == [200, 200, 200, 400, 200, 200, 200, 400]
    assert mixed[3][1]["code"] == 400 and "PNG" in mixed[3][1]["message"]
    assert "not valid JSON" in mixed[7][1]["message"]
    together = [out for status, out in mixed if status == 200]
    assert len(together) == len(alone)
    assert all(answers_close(t, a) for t, (_, a) in zip(together, alone)), (together, alone)


def test_describe_shows_the_archive_meta(digits):
    handler = digits._entry_point.__self__  # the ImageClassifierHandler instance
    described = handler.describe_handle()
    assert described["meta"]["name"] == "digits" and described["meta"]["heldout_accuracy"] >= 0.97


def copy_with_config(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model-config.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    edit(config)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(dst)


def test_stock_answer_shape_is_an_archive_setting(photo_classifier, extracted_archives, samples, tmp_path):
    """handler.answer: stock answers as TorchServe's stock image_classifier does ({label:
    probability}, best first), so clients migrating from it keep working; same figures."""
    folder = copy_with_config(extracted_archives["efficientnet_lite0"], tmp_path / "stock",
                              lambda c: c["handler"].update(answer="stock"))
    stock_service = load_service(folder, batch_size=2)
    photos = [("body", JPEG, photo) for photo in samples.photo_bytes()]
    ours, stock = infer(photo_classifier, photos), infer(stock_service, photos)
    for (status, project_answer), (stock_status, stock_answer) in zip(ours, stock):
        assert status == stock_status == 200
        assert isinstance(stock_answer, dict) and len(stock_answer) == 5
        assert list(stock_answer) == [p["label"] for p in project_answer]
        assert all(abs(stock_answer[p["label"]] - p["probability"]) <= PROBABILITY_ATOL for p in project_answer)


def test_bad_configuration_fails_the_load_naming_the_key(extracted_archives, tmp_path):
    folder = copy_with_config(extracted_archives["digits"], tmp_path / "digits",
                              lambda c: c["handler"]["runtime"].update(dtype="int3"))
    with pytest.raises(ValueError, match="'handler.runtime.dtype' is 'int3'; allowed values"):
        load_service(folder)


def test_weights_that_do_not_fit_fail_at_load_not_at_first_request(extracted_archives, tmp_path):
    folder = copy_with_config(extracted_archives["digits"], tmp_path / "digits",
                              lambda c: c["handler"]["model"]["kwargs"].update(num_classes=7))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_service(folder)


STAGES = {"parse_config", "load", "warm_up_requests", "warm_up_answered", "prepare", "forward", "answer",
          "describe"}


@pytest.mark.parametrize("name", ["image_classifier.py", "text_embedder.py", "tabular_regressor.py"])
def test_a_family_handler_writes_only_its_stages_over_the_staged_base(name):
    """TorchServe loads the one class the handler file defines; loading, warm-up, metrics,
    profiling, out-of-memory splitting and per-request statuses are the base's, for every family."""
    import ast
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "handlers", name)) as f:
        tree = ast.parse(f.read())
    [handler] = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert [base.id for base in handler.bases] == ["StagedHandler"]
    members = {node.name for node in handler.body if isinstance(node, ast.FunctionDef)}
    members |= {target.id for node in handler.body if isinstance(node, ast.Assign) for target in node.targets}
    assert members <= STAGES, members - STAGES
