"""A real TorchServe (Java frontend + Python workers) on free 127.0.0.1 ports, configured as
config.properties is; the archives are registered through the management API."""
import base64
import io
import json
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from models.catalog import load_catalog
from tests.answers import assert_answers_close

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(catalog, model_store, torchserve_factory):
    models = [*catalog.loaded_at_start,  # as `make serve` serves them
              # A copy of digits with a long batch delay, so that concurrent requests share one batch.
              ("digits.mar", dict(model_name="digits_batched", batch_size=8, max_batch_delay=2000,
                                  initial_workers=1))]
    with torchserve_factory.start("ts", models=models, catalog=catalog, store=model_store) as ts:
        yield ts


def post(server, model, data, headers=None, **kwargs):
    auth = {"Authorization": f"Bearer {server.client.key('inference')}"}
    return requests.post(f"{server.inference_url}/predictions/{model}", data=data,
                         headers={**auth, **(headers or {})}, timeout=120, **kwargs)


def test_calls_without_the_key_are_refused_and_with_it_succeed(server):
    for url in (f"{server.inference_url}/ping", f"{server.management_url}/models"):
        refused = requests.get(url, timeout=10)
        assert refused.status_code == 400 and "InvalidKeyException" in refused.text
    assert server.client.ping() == {"status": "Healthy"}
    names = {m["modelName"] for m in server.client.list_models()}
    assert {"efficientnet_lite0", "digits"} <= names


def test_renewed_inference_key_replaces_the_old_one(server, samples):
    old = server.client.key("inference")
    server.client.renew_key("inference")
    assert server.client.key("inference") != old
    stale = requests.get(f"{server.inference_url}/ping", headers={"Authorization": f"Bearer {old}"}, timeout=10)
    assert stale.status_code == 400
    assert server.client.ping()["status"] == "Healthy"


def test_photographs_in_every_wire_format(server, samples):
    for photo in samples.photo_bytes():
        raw = post(server, "efficientnet_lite0", photo, {"Content-Type": "image/jpeg"})
        multipart = requests.post(f"{server.inference_url}/predictions/efficientnet_lite0",
                                  files={"data": ("photo.jpg", photo, "image/jpeg")},
                                  headers={"Authorization": f"Bearer {server.client.key('inference')}"},
                                  timeout=120)
        as_json = post(server, "efficientnet_lite0", json.dumps({"data": base64.b64encode(photo).decode()}),
                       {"Content-Type": "application/json"})
        for response in (raw, multipart, as_json):
            assert response.status_code == 200, response.text
            top5 = response.json()
            assert len(top5) == 5 and top5[0]["label"] and 0 < top5[0]["probability"] <= 1
        assert_answers_close(multipart.json(), raw.json(), "multipart vs raw")
        assert_answers_close(as_json.json(), raw.json(), "base64 JSON vs raw")


def test_digits_are_recognized(server, samples):
    _, _, images, labels = samples.digits_split()
    correct = 0
    for pixels, label in zip(images[:40], labels[:40]):
        response = post(server, "digits", samples.png_bytes(pixels), {"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        correct += int(response.json()[0]["label"] == str(label))
    assert correct >= 39  # the model's held-out accuracy is about 99%
    upscaled = Image.fromarray(images[0]).resize((64, 64), Image.NEAREST)
    buffer = io.BytesIO()
    upscaled.save(buffer, format="PNG")
    assert post(server, "digits", buffer.getvalue()).json()[0]["label"] == str(labels[0])


def test_corrupt_image_inside_a_batch_fails_alone(server, samples):
    _, _, images, labels = samples.digits_split()
    bodies = [samples.png_bytes(p) for p in images[:7]]
    png = samples.png_bytes(images[7])
    bodies.insert(3, png[:len(png) - 20])  # truncated inside its pixel data
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i):
        barrier.wait()
        results[i] = post(server, "digits_batched", bodies[i], {"Content-Type": "image/png"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[3].status_code == 400
    assert "PNG image could not be decoded" in results[3].json()["message"]
    good = [r for i, r in enumerate(results) if i != 3]
    assert all(r.status_code == 200 for r in good)
    assert [r.json()[0]["label"] for r in good] == [str(l) for l in labels[:7]]


@pytest.mark.parametrize("body, headers, status, message", [
    (b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
    (b"<html>hello</html>", {"Content-Type": "image/jpeg"}, 400, "not a recognizable image"),
    (b'{"data": "%%%"}', {"Content-Type": "application/json"}, 400, "not valid base64"),
    (b"{broken", {"Content-Type": "application/json"}, 400, "not valid JSON"),
])
def test_bad_requests_get_a_4xx_that_says_why(server, body, headers, status, message):
    response = post(server, "efficientnet_lite0", body, headers)
    assert response.status_code == status
    assert message in response.json()["message"]


def test_phone_sized_photo_is_accepted(server, samples):
    """Above TorchServe's default 6.5 MB request limit, as 12 MP phone photos often are."""
    photo = Image.open(io.BytesIO(samples.photo_bytes()[1])).convert("RGB").resize((4032, 3024))
    noise = np.random.default_rng(0).integers(-30, 30, (3024, 4032, 3))  # sensor-like detail
    photo = Image.fromarray(np.clip(np.asarray(photo, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    assert buffer.tell() > 6.5 * 1024 * 1024
    response = post(server, "efficientnet_lite0", buffer.getvalue(), {"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text


def test_describe_reports_ready_workers_and_the_archive_meta(server):
    description = server.client.describe("digits")[0]
    assert description["batchSize"] == 8 and description["workers"][0]["status"] == "READY"
    customized = server.client.describe("digits", customized=True)[0]
    meta = customized["customizedMetadata"]["meta"]
    assert meta["heldout_accuracy"] >= 0.97


def check_answers(server, entry, samples):
    """Send the family's real sample inputs to ``entry`` (as registered) and check the answers."""
    url_name = entry.name if entry.is_default else f"{entry.name}/{entry.version}"
    if entry.family == "text":
        from models import sentences
        first, second = zip(*sentences.PARAPHRASES[:4])
        answer = post(server, url_name, json.dumps({"inputs": list(first + second)}),
                      {"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        vectors = np.asarray(answer.json()["embeddings"])
        similarity = vectors @ vectors.T
        paraphrase = [similarity[i, 4 + i] for i in range(4)]
        unrelated = [similarity[i, 4 + (i + 1) % 4] for i in range(4)]
        assert vectors.shape == (8, 384) and min(paraphrase) > max(unrelated)
    elif entry.family == "tabular":
        from models.tabular import diabetes_split
        _, _, rows, targets, _ = diabetes_split()
        answer = post(server, url_name, json.dumps(rows[:20].tolist()), {"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        predictions = np.asarray(answer.json()["predictions"])
        assert predictions.shape == (20,)
        assert np.corrcoef(predictions, targets[:20])[0, 1] > 0.5  # a model of the data, not noise
    elif entry.base == "digits":
        _, _, images, labels = samples.digits_split()
        answers = [post(server, url_name, samples.png_bytes(p)) for p in images[:20]]
        assert all(a.status_code == 200 for a in answers)
        correct = sum(a.json()[0]["label"] == str(l) for a, l in zip(answers, labels[:20]))
        assert correct >= 19
    else:  # a real ImageNet classifier: the photographs' own classes on top
        for name, photo in zip(samples.PHOTO_NAMES, samples.photo_bytes()):
            answer = post(server, url_name, photo, {"Content-Type": "image/jpeg"})
            assert answer.status_code == 200 and len(answer.json()) == 5, answer.text
            top1 = answer.json()[0]["label"]
            assert top1 in samples.PHOTO_CLASSES[name], f"{url_name}: {name} answered {answer.json()}"


@pytest.mark.parametrize("stem", [m.mar_name[:-4] for m in load_catalog().loaded_at_start])
def test_every_served_model_answers_its_real_inputs(server, catalog, samples, stem):
    entry = catalog.archive(stem)
    check_answers(server, entry, samples)
    meta = server.client.describe(entry.name, entry.version, customized=True)[0]["customizedMetadata"]["meta"]
    assert meta["version"] == entry.version


@pytest.mark.parametrize("name", [m.name for m in load_catalog().models if not m.load_at_start])
def test_every_variant_serves_through_torchserve(server, catalog, samples, name):
    """Registered through the management API with its catalog settings, answered, unregistered."""
    entry = catalog.model(name)
    server.client.register(entry.mar_name, synchronous="true", **entry.registration())
    try:
        check_answers(server, entry, samples)
        meta = server.client.describe(entry.name, customized=True)[0]["customizedMetadata"]["meta"]
        assert meta["variant"] == entry.variant
        if entry.family == "text":  # a variant that loses precision says so
            assert meta["fidelity"]["lossy"] == (meta["fidelity"]["min_cosine"] < 0.99)
    finally:
        server.client.unregister(entry.name)


def test_text_requests_that_cannot_be_embedded_get_a_4xx(server):
    cases = [(b"   ", "text/plain", 400, "text 0 is empty"),
             (b"\xff\xfe bad", "text/plain", 400, "not UTF-8"),
             (b'{"inputs": [1, 2]}', "application/json", 400, "must be a string"),
             (("word " * 3000).encode(), "text/plain", 413, "above the limit")]
    for body, content_type, status, message in cases:
        response = post(server, "minilm", body, {"Content-Type": content_type})
        assert response.status_code == status, (body[:20], response.text)
        assert message in response.json()["message"]


def metric_samples(text: str, name: str) -> dict:
    """{labels string: value} of one metric in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name):].rpartition(" ")
            out[labels] = float(value)
    return out


def test_prometheus_scrape_has_the_handlers_own_metrics(server, samples):
    _, _, images, _ = samples.digits_split()
    for pixels in images[:4]:
        assert post(server, "digits", samples.png_bytes(pixels)).status_code == 200
    assert post(server, "digits", b"<html>not an image</html>").status_code == 400
    scrape = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert scrape.status_code == 200
    text = scrape.text

    def value(name, **labels):
        found = [v for k, v in metric_samples(text, name).items()
                 if all(f'{label}="{wanted}"' in k for label, wanted in labels.items())]
        assert found, f"{name} {labels} not in the scrape"
        return sum(found)

    assert value("HandlerBatches", ModelName="digits", ModelVersion="1.0") >= 5
    assert value("HandlerBatchRequests", ModelName="digits") >= 5
    assert value("HandlerInferenceMilliseconds", ModelName="digits") > 0
    assert value("HandlerPreprocessMilliseconds", ModelName="digits") > 0
    assert value("HandlerRejectedInputs", ModelName="digits", Reason="bad_input") >= 1
