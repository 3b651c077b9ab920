"""`make serve` / `make stop`: the project's TorchServe on the addresses in config.properties.

    python -m scripts.serve start   # start (or find running), wait until every model is READY
    python -m scripts.serve stop
    python -m scripts.serve key inference|management   # a valid key, renewed if expired
"""
import argparse
import contextlib
import os
import sys
import time

from scripts.catalog import CONFIG_PROPERTIES_PATH, MODEL_STORE, ROOT, load_catalog
from scripts.manage import enforce_default_versions, history_path_for
from scripts.ts_client import TorchServeError
from scripts.ts_server import TorchServe, check_java

SERVER_HOME = os.path.join(ROOT, ".serve")  # pid file and temporary files of `make serve`


def project_server() -> TorchServe:
    """The server of config.properties, run from the project root as `torchserve --start` would
    be: key_file.json lands there and model_store=model_store resolves to ./model_store."""
    return TorchServe(SERVER_HOME, CONFIG_PROPERTIES_PATH, cwd=ROOT)


def start(timeout_s: float) -> int:
    server = project_server()
    catalog = load_catalog()
    if server.pid():
        print(f"TorchServe is already running (pid {server.pid()}); not starting another.")
    else:
        missing = [m.mar_name for m in catalog.loaded_at_start if not os.path.exists(os.path.join(MODEL_STORE, m.mar_name))]
        if missing:
            print(f"missing archives {missing}: run `make build` first", file=sys.stderr)
            return 1
        print(f"using {check_java()}")
        with contextlib.suppress(FileNotFoundError):  # rollbacks belong to the previous run's switches
            os.remove(history_path_for(ROOT))
        print(f"starting TorchServe with config.properties (logs in "
              f"{os.path.relpath(SERVER_HOME, ROOT)}/logs) ...", flush=True)
        server.start()
    started = time.monotonic()

    last_report = [0.0]

    def progress(state):
        if time.monotonic() - last_report[0] >= 10:
            last_report[0] = time.monotonic()
            print(f"  waiting for workers ({time.monotonic() - started:.0f} s): {state}", flush=True)

    served = [f"{m.name}/{m.version}" for m in catalog.loaded_at_start]
    try:
        ready = server.client.wait_ready(served, timeout_s, progress)
    except TimeoutError as exc:
        print(f"{exc}\n{server.log_tail()}", file=sys.stderr)
        return 1
    # TorchServe 0.12 makes the first version it loads the default, whatever models= says.
    for name, (old, new) in enforce_default_versions(server.client, catalog.default_versions()).items():
        print(f"  {name}: default version set to {new} (TorchServe had chosen {old})")
    key_cmd = "$(.venv/bin/python -m scripts.serve key inference)"
    print("\nTorchServe is ready:")
    for entry in catalog.loaded_at_start:
        url = f"{server.inference_url}/predictions/{entry.name}"
        links = f"{url} and {url}/{entry.version}" if entry.is_default else f"{url}/{entry.version}"
        print(f"  {entry.name:<10} {entry.version:<5} {ready[f'{entry.name}/{entry.version}']} READY "
              f"worker(s)  {links}")
    print(f"  inference API:  {server.inference_url}\n  management API: {server.management_url}\n"
          f"  metrics:        {server.metrics_url}/metrics\n"
          f"  keys:           {os.path.relpath(server.client.key_file, ROOT)}\n\nTry:\n"
          f'  curl -H "Authorization: Bearer {key_cmd}" -T build/samples/china.jpg '
          f"{server.inference_url}/predictions/efficientnet_lite0\n")
    return 0


def stop() -> int:
    server = project_server()
    if not server.pid():
        print("TorchServe (make serve) is not running.")
        return 0
    server.stop()
    print("TorchServe stopped.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start_cmd = sub.add_parser("start")
    start_cmd.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("stop")
    key_cmd = sub.add_parser("key")
    key_cmd.add_argument("kind", choices=("inference", "management"))
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args.timeout)
    if args.command == "stop":
        return stop()
    server = project_server()
    try:
        print(server.client.key(args.kind) or "")
    except (TorchServeError, OSError) as exc:
        print(f"cannot get a key: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
