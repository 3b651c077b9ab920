"""Send images to the inference API and print the answers.

    python -m scripts.serving.client efficientnet_lite0 build/samples/china.jpg
    python -m scripts.serving.client digits build/samples/digit_7_0.png --format base64
    python -m scripts.serving.client digits a.png b.png --version 1.0

Addresses come from config.properties and the key from the key_file.json that `make serve`'s
TorchServe wrote (renewed through the management API when it has expired).
"""
import argparse
import base64
import json
import os
import sys

from models.catalog import CONFIG_PROPERTIES_PATH, ROOT, parse_config_properties
from scripts.serving.ts_client import TorchServeClient, TorchServeError

FORMATS = ("raw", "multipart", "base64")


def send(client: TorchServeClient, model: str, path: str, fmt: str, version=None):
    with open(path, "rb") as f:
        data = f.read()
    if fmt == "raw":
        return client.predict_raw(model, data, version)
    if fmt == "multipart":
        return client.predict_multipart(model, os.path.basename(path), data, version=version)
    body = json.dumps({"data": base64.b64encode(data).decode()})
    return client.predict_raw(model, body.encode(), version, content_type="application/json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--version")
    parser.add_argument("--format", choices=FORMATS, default="raw", help="wire format (default raw)")
    parser.add_argument("--config", default=CONFIG_PROPERTIES_PATH)
    parser.add_argument("--home", default=ROOT, help="folder holding TorchServe's key_file.json")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        props = parse_config_properties(f.read())
    client = TorchServeClient(props["inference_address"], props["management_address"], args.home)
    failures = 0
    for path in args.files:
        try:
            response = send(client, args.model, path, args.format, args.version)
        except (OSError, TorchServeError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code != 200:
            failures += 1
        print(json.dumps({"file": path, "status": response.status_code, "response": body}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
