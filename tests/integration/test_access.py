"""Access control and safe loading, against a real TorchServe where it matters: keys (wrong,
swapped, expired and renewed), loopback-only listeners, registration from the model store only
(allowed_urls), weights carrying pickled code, archives checked against their recorded sums, and
the request size limit."""
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from urllib.parse import urlparse

import psutil
import pytest
import requests
import torch

from handler_kit import runtime
from handler_kit.errors import ConfigError
from scripts.serving import ts_client
from scripts.build import verify_archives
from models.catalog import ROOT, load_catalog, parse_config_properties

# The catalog's (and config.properties') value: no URL of any kind may be registered (TorchServe's
# default 'file://.*|http(s)?://.*' downloads or copies anything into the store); archives are
# registered by name and resolved inside model_store.
ALLOWED_URLS = load_catalog().server["allowed_urls"]
TORCHSERVE_DEFAULT_ALLOWED_URLS = "file://.*|http(s)?://.*"
KEY_REFUSED = "InvalidKeyException"
MAX_REQUEST_SIZE = int(load_catalog().server["max_request_size"])

integration = pytest.mark.integration


class CodeOnUnpickle:
    """What a hostile weights file carries: unpickling it calls open(marker, 'w')."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_weights(clean_weights: bytes, marker: str) -> bytes:
    """A real state_dict with one more entry that runs code when unpickled."""
    state = torch.load(io.BytesIO(clean_weights), weights_only=True)
    state["bn.extra_state"] = CodeOnUnpickle(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def copy_archive(src: str, dst: str, replacements: dict) -> str:
    """The archive at ``src`` with some entries' bytes replaced, written to ``dst``."""
    with zipfile.ZipFile(src) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries.update(replacements)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return dst


def read_member(archive_path: str, name: str) -> bytes:
    with zipfile.ZipFile(archive_path) as archive:
        return archive.read(name)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def listening_addresses(pid: int) -> set:
    """(address, port) of the process's listening sockets; Java listens on IPv6 sockets, so an
    IPv4 address shows as ::ffff:a.b.c.d and is reported as a.b.c.d here."""
    out = set()
    for c in psutil.Process(pid).connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(c.laddr.ip)
            out.add((str(getattr(address, "ipv4_mapped", None) or address), c.laddr.port))
    return out


def expiry(key_file: str, kind: str) -> float:
    with open(key_file, encoding="utf-8") as f:
        stamp = json.load(f)[kind]["expiration time"]
    return datetime.fromisoformat(stamp.rstrip("Z")[:26]).replace(tzinfo=timezone.utc).timestamp()


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> str:
    """Created only if pickled code ran somewhere."""
    return str(tmp_path_factory.mktemp("marker") / "code-ran")


@pytest.fixture(scope="module")
def store(model_store, marker, tmp_path_factory) -> str:
    """A store of its own: digits.mar, and hostile.mar (digits with pickled code in its weights)."""
    folder = tmp_path_factory.mktemp("store")
    digits = shutil.copy(os.path.join(model_store, load_catalog().model("digits").mar_name),
                         folder / "digits.mar")
    hostile = pickled_weights(read_member(digits, "weights.pt"), marker)
    copy_archive(digits, str(folder / "hostile.mar"), {"weights.pt": hostile})
    return str(folder)


@pytest.fixture(scope="module")
def server(store, torchserve_factory):
    """Configured as config.properties is, with the proposed allowed_urls; digits registered."""
    with torchserve_factory.start("ts", store=store, allowed_urls=ALLOWED_URLS,
                                  models=[("digits.mar", load_catalog().model("digits").registration())],
                                  ready_timeout=300) as ts:
        yield ts


@pytest.fixture(scope="module")
def bare_server(model_store, tmp_path_factory, torchserve_factory):
    """TorchServe's own defaults (allowed_urls included), keys valid for 6 s, no model."""
    folder = tmp_path_factory.mktemp("bare-store")
    shutil.copy(os.path.join(model_store, load_catalog().model("digits").mar_name), folder)
    with torchserve_factory.start("ts-bare", store=str(folder), token_expiration_min=0.1,
                                  allowed_urls=TORCHSERVE_DEFAULT_ALLOWED_URLS) as ts:
        yield ts


@pytest.fixture
def digit_png(samples) -> bytes:
    _, _, images, _ = samples.digits_split()
    return samples.png_bytes(images[0])


# -- listeners ---------------------------------------------------------------------------------
@integration
def test_the_server_listens_on_loopback_only(server):
    """Every listener of the frontend (inference, management, metrics, both gRPC ports), as the
    catalog's server block configures them (test_catalog checks config.properties says so)."""
    addresses = listening_addresses(server.pid())
    ports = {urlparse(u).port for u in (server.inference_url, server.management_url, server.metrics_url)}
    assert ports <= {port for _, port in addresses} and len(addresses) >= 5
    assert {ip for ip, _ in addresses} == {"127.0.0.1"}, addresses


@integration
def test_metrics_answer_without_a_key_so_they_listen_on_loopback_only(server):
    """TorchServe 0.12 does not authorize the metrics API: loopback is its only protection."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200 and "# TYPE" in response.text
    port = urlparse(server.metrics_url).port
    assert {ip for ip, p in listening_addresses(server.pid()) if p == port} == {"127.0.0.1"}


# -- keys --------------------------------------------------------------------------------------
@integration
def test_wrong_or_swapped_keys_are_refused_and_the_right_ones_accepted(server, digit_png):
    inference, management = server.client.key("inference"), server.client.key("management")
    predict = f"{server.inference_url}/predictions/digits"
    register = f"{server.management_url}/models?url=digits.mar&model_name=intruder"
    refused = [
        requests.post(predict, data=digit_png, timeout=60),
        requests.post(predict, data=digit_png, headers=bearer("not-a-key"), timeout=60),
        requests.post(predict, data=digit_png, headers=bearer(management), timeout=60),
        requests.post(register, timeout=60),
        requests.post(register, headers=bearer(inference), timeout=60),
        requests.get(f"{server.management_url}/models", headers=bearer(inference), timeout=60),
        requests.get(f"{server.management_url}/token?type=inference", headers=bearer(management),
                     timeout=60),
    ]
    for response in refused:
        assert response.status_code == 400, (response.url, response.text)
        assert response.json()["type"] == KEY_REFUSED
    assert requests.post(predict, data=digit_png, headers=bearer(inference), timeout=60).status_code == 200
    models = requests.get(f"{server.management_url}/models", headers=bearer(management), timeout=60)
    assert [m["modelName"] for m in models.json()["models"]] == ["digits"]  # no intruder


@integration
def test_expired_keys_are_refused_and_the_client_renews_them_without_a_restart(bare_server):
    client, pid = bare_server.client, bare_server.pid()
    with open(client.key_file, encoding="utf-8") as f:
        stale = json.load(f)
    time.sleep(max(0.0, max(expiry(client.key_file, k) for k in ("inference", "management"))
                   - time.time() + 1))
    ping = requests.get(f"{bare_server.inference_url}/ping",
                        headers=bearer(stale["inference"]["key"]), timeout=30)
    models = requests.get(f"{bare_server.management_url}/models",
                          headers=bearer(stale["management"]["key"]), timeout=30)
    assert ping.status_code == models.status_code == 400 and KEY_REFUSED in ping.text + models.text
    assert client.ping() == {"status": "Healthy"}
    assert client.list_models() == []
    assert client.key("inference") != stale["inference"]["key"]
    assert bare_server.pid() == pid


@integration
def test_client_renews_and_retries_when_the_server_refuses_its_key(bare_server, monkeypatch):
    """As when the client's clock is behind: it believes the key valid, the server refuses it."""
    client = bare_server.client
    time.sleep(max(0.0, expiry(client.key_file, "inference") - time.time() + 1))
    monkeypatch.setattr(ts_client, "_expired", lambda *args, **kwargs: False)
    stale = client.key("inference")
    renewed = []
    renew = client.renew_key
    monkeypatch.setattr(client, "renew_key", lambda kind: (renewed.append(kind), renew(kind)))
    assert client.ping() == {"status": "Healthy"}
    assert renewed == ["inference"] and client.key("inference") != stale


# -- registration only from the model store ----------------------------------------------------
@integration
@pytest.mark.parametrize("url, reason", [
    ("http://example.invalid/x.mar", "does not match any allowed URL(s)"),
    ("https://example.invalid/x.mar", "does not match any allowed URL(s)"),
    ("file:///etc/passwd", "does not match any allowed URL(s)"),
    ("file://{outside}/digits.mar", "does not match any allowed URL(s)"),
    ("file://{store}/digits.mar", "does not match any allowed URL(s)"),
    ("../{store_name}/digits.mar", "Relative path is not allowed in url"),
])
def test_registration_from_outside_the_store_is_refused(server, store, tmp_path, url, reason):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(store, "digits.mar"), outside)
    url = url.format(outside=outside, store=store, store_name=os.path.basename(store))
    before = sorted(os.listdir(store))
    response = server.client._call("management", "POST", "/models", timeout=120,
                                   params={"url": url, "model_name": "intruder"})
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["type"] == "ModelNotFoundException" and reason in body["message"]
    assert sorted(os.listdir(store)) == before
    assert "intruder" not in {m["modelName"] for m in server.client.list_models()}


@integration
def test_with_torchserve_default_allowed_urls_any_file_is_copied_into_the_store(bare_server, tmp_path):
    """Why allowed_urls must be set: TorchServe's default accepts any file:// (or http) URL and
    copies what it points to into the model store before it even looks at it."""
    outside = tmp_path / "not-an-archive.txt"
    outside.write_text("anything readable by the server")
    store = parse_config_properties(open(bare_server.config_path).read())["model_store"]
    response = bare_server.client._call("management", "POST", "/models", timeout=120,
                                        params={"url": f"file://{outside}"})
    assert response.status_code >= 400
    assert "not-an-archive.txt" in os.listdir(store)


# -- weights carrying pickled code -------------------------------------------------------------
def test_the_hostile_weights_really_run_code_when_unpickled_freely(store, tmp_path):
    """The check below is meaningful: a plain torch.load runs the payload."""
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    path.write_bytes(pickled_weights(read_member(os.path.join(store, "digits.mar"), "weights.pt"),
                                     str(marker)))
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loader_refuses_weights_carrying_pickled_code(store, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    path.write_bytes(pickled_weights(read_member(os.path.join(store, "digits.mar"), "weights.pt"),
                                     str(marker)))
    with pytest.raises(ConfigError, match="refusing to load weights.pt: it is not a plain tensor"):
        runtime.load_state_dict(str(path), torch.device("cpu"))
    with pytest.raises(ConfigError, match="refusing to load weights.pt"):
        runtime.build_model("models.digits_cnn", "DigitsCNN", {"num_classes": 10}, str(path),
                            torch.device("cpu"), channels_last=False)
    assert not marker.exists()


@integration
def test_archive_with_pickled_weights_fails_to_register_with_the_reason_logged(server, marker):
    response = server.client._call("management", "POST", "/models", timeout=600,
                                   params={"url": "hostile.mar", "model_name": "hostile",
                                           "synchronous": "true"})
    assert response.status_code == 500, response.text
    assert response.json()["message"] == "Failed to start workers for model hostile version: 1.0"
    assert "hostile" not in {m["modelName"] for m in server.client.list_models()}
    with open(os.path.join(server.home, "logs", "model_log.log"), errors="replace") as f:
        log = f.read()
    assert "ConfigError: refusing to load weights.pt: it is not a plain tensor state_dict" in log
    assert not os.path.exists(marker)


# -- archives against their recorded sums ------------------------------------------------------
@pytest.fixture
def store_copy(model_store, tmp_path) -> str:
    """The small archives of the real store with the sums the build recorded for them."""
    recorded = verify_archives.read_sums(os.path.join(model_store, verify_archives.SUMS_FILE))
    names = [n for n in recorded if n.startswith("digits") and os.path.isfile(os.path.join(model_store, n))]
    assert names, "no digits archives listed in model_store/SHA256SUMS"
    for name in names:
        shutil.copy(os.path.join(model_store, name), tmp_path)
    (tmp_path / verify_archives.SUMS_FILE).write_text(
        "".join(f"{recorded[n]}  {n}\n" for n in names))
    return str(tmp_path)


def test_the_built_store_matches_its_recorded_sums(model_store):
    assert verify_archives.check_store(model_store) == []


def test_a_copy_of_the_store_passes_until_it_is_tampered_with(store_copy):
    assert verify_archives.check_store(store_copy) == []
    target = os.path.join(store_copy, "digits.mar")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    result = subprocess.run([sys.executable, "-m", "scripts.build.verify_archives", "--store", store_copy],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "digits.mar: sha256" in result.stderr and "differs" in result.stderr
    assert len(verify_archives.check_store(store_copy)) == 1


def test_missing_and_unlisted_archives_are_named(store_copy):
    listed = sorted(verify_archives.read_sums(os.path.join(store_copy, verify_archives.SUMS_FILE)))
    os.remove(os.path.join(store_copy, listed[0]))
    shutil.copy(os.path.join(store_copy, listed[1]), os.path.join(store_copy, "smuggled.mar"))
    problems = verify_archives.check_store(store_copy)
    assert problems == [f"{listed[0]}: listed in SHA256SUMS but missing from the store",
                        "smuggled.mar: in the store but not listed in SHA256SUMS"]
    assert verify_archives.main(["--store", store_copy]) == 1


def test_a_store_without_sums_is_refused(tmp_path):
    assert "SHA256SUMS is missing" in verify_archives.check_store(str(tmp_path))[0]


# -- request size ------------------------------------------------------------------------------
@integration
def test_body_over_max_request_size_gets_413_from_the_frontend(server):
    over = server.client.predict_raw("digits", b"\0" * (26 * 1024 * 1024), timeout=120)
    assert over.status_code == 413 and over.content == b""  # TorchServe answers with no body
    at_limit = server.client.predict_raw("digits", b"\0" * MAX_REQUEST_SIZE, timeout=120)
    assert at_limit.status_code == 400  # through the frontend: our handler says why
    assert "not a recognizable image" in at_limit.json()["message"]
