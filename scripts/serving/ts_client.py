"""A small client for TorchServe's HTTP APIs with its token authorization.

TorchServe 0.12 writes key_file.json (management, inference and API keys) where it was started;
without a key every call, /ping included, answers 400 InvalidKeyException, and the inference and
management keys expire (token_expiration_min, 60 by default). This client reads the file, and when
a key is expired or refused it asks the management API's /token call (authorized by the API key)
for a fresh one and retries once.
"""
import json
import os
import threading
import time
from datetime import datetime, timezone
from typing import Dict, Iterable, Optional

import requests

KEY_FILE = "key_file.json"


class TorchServeError(RuntimeError):
    def __init__(self, response: requests.Response):
        self.status = response.status_code
        try:
            body = response.json()
            message = body.get("message", body) if isinstance(body, dict) else body
        except ValueError:
            message = response.text
        super().__init__(f"HTTP {self.status} from {response.request.method} {response.url}: {message}")


def _expired(expiry: Optional[str], margin_s: float = 60.0) -> bool:
    if not expiry:
        return False
    try:
        when = datetime.fromisoformat(expiry.rstrip("Z")[:26]).replace(tzinfo=timezone.utc)
    except ValueError:
        return False
    return when.timestamp() - margin_s < time.time()


class TorchServeClient:
    def __init__(self, inference_url: str, management_url: str, home: str = ".",
                 timeout: float = 60.0):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_file = os.path.join(home, KEY_FILE)
        self.timeout = timeout
        self._local = threading.local()  # requests.Session is not thread-safe: one per thread
        self._keys_cache = (None, None)  # (mtime, parsed key file)

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    # -- keys -------------------------------------------------------------------------------
    def _keys(self) -> Optional[dict]:
        """The key file, re-read only when TorchServe has rewritten it."""
        try:
            mtime = os.stat(self.key_file).st_mtime_ns
        except FileNotFoundError:
            return None  # token authorization is off
        if self._keys_cache[0] != mtime:
            with open(self.key_file, encoding="utf-8") as f:
                self._keys_cache = (mtime, json.load(f))
        return self._keys_cache[1]

    def key(self, kind: str) -> Optional[str]:
        """A valid key of ``kind`` ('inference' or 'management'), renewed when expired."""
        keys = self._keys()
        if keys is None:
            return None
        entry = keys[kind]
        if _expired(entry.get("expiration time")):
            self.renew_key(kind)
            entry = self._keys()[kind]
        return entry["key"]

    def renew_key(self, kind: str) -> None:
        keys = self._keys()
        if keys is None:
            return
        response = self.session.get(f"{self.management_url}/token", params={"type": kind},
                                    headers={"Authorization": f"Bearer {keys['API']['key']}"},
                                    timeout=self.timeout)
        if response.status_code >= 400:
            raise TorchServeError(response)

    def _call(self, api: str, method: str, path: str, headers: Optional[dict] = None,
              timeout: Optional[float] = None, **kwargs) -> requests.Response:
        base = self.inference_url if api == "inference" else self.management_url
        for attempt in (1, 2):
            key = self.key(api)
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            response = self.session.request(method, base + path, headers={**(headers or {}), **auth},
                                            timeout=timeout or self.timeout, **kwargs)
            refused = response.status_code == 400 and "InvalidKeyException" in response.text
            if not (refused and key and attempt == 1):
                return response
            self.renew_key(api)  # expired between our check and the call
        return response

    def _json(self, api: str, method: str, path: str, **kwargs):
        response = self._call(api, method, path, **kwargs)
        if response.status_code >= 400:
            raise TorchServeError(response)
        return response.json() if response.content else None

    # -- inference API ----------------------------------------------------------------------
    def ping(self) -> dict:
        return self._json("inference", "GET", "/ping", timeout=10)

    def predict_raw(self, model: str, data: bytes, version: Optional[str] = None,
                    content_type: str = "application/octet-stream", **kwargs) -> requests.Response:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self._call("inference", "POST", path, data=data,
                          headers={"Content-Type": content_type}, **kwargs)

    def predict_multipart(self, model: str, filename: str, data: bytes, field: str = "data",
                          version: Optional[str] = None, **kwargs) -> requests.Response:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self._call("inference", "POST", path, files={field: (filename, data)}, **kwargs)

    def predict(self, model: str, data: bytes, version: Optional[str] = None, **kwargs):
        response = self.predict_raw(model, data, version, **kwargs)
        if response.status_code >= 400:
            raise TorchServeError(response)
        return response.json()

    # -- management API ---------------------------------------------------------------------
    def list_models(self) -> list:
        return self._json("management", "GET", "/models")["models"]

    def describe(self, model: str, version: Optional[str] = None, customized: bool = False) -> list:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._json("management", "GET", path,
                          params={"customized": "true"} if customized else None)

    def register(self, url: str, **params) -> dict:
        return self._json("management", "POST", "/models",
                          params={"url": url, **params}, timeout=max(self.timeout, 600))

    def unregister(self, model: str, version: Optional[str] = None) -> dict:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._json("management", "DELETE", path)

    def ready_workers(self, model: str, version: Optional[str] = None) -> int:
        description = self.describe(model, version)
        return sum(1 for w in description[0].get("workers", []) if w.get("status") == "READY")

    def wait_ready(self, models: Iterable[str], timeout_s: float = 300.0,
                   progress=None) -> Dict[str, int]:
        """Block until /ping is healthy and each model ("name" or "name/version") has a READY
        worker."""
        deadline = time.monotonic() + timeout_s
        models = list(models)
        last_error = None
        while time.monotonic() < deadline:
            try:
                if self.ping().get("status") == "Healthy":
                    ready = {m: self.ready_workers(*m.split("/", 1)) for m in models}
                    if all(ready.values()):
                        return ready
                    last_error = f"workers not ready yet: {ready}"
            except (requests.RequestException, TorchServeError, FileNotFoundError, KeyError) as exc:
                last_error = str(exc)
            if progress:
                progress(last_error)
            time.sleep(1.0)
        raise TimeoutError(f"TorchServe not ready after {timeout_s:.0f} s: {last_error}")
