"""Manage the models and versions a running TorchServe serves, through its management API.

    python -m scripts.serving.manage list
    python -m scripts.serving.manage describe digits [2.0]
    python -m scripts.serving.manage register digits_v2.0.mar [--batch-size 8] [--workers 1] [--no-wait]
    python -m scripts.serving.manage scale digits [2.0] --min 2 [--max 2]
    python -m scripts.serving.manage set-default digits 2.0
    python -m scripts.serving.manage rollback digits
    python -m scripts.serving.manage unregister digits 2.0

Addresses and keys default to `make serve`'s server (config.properties, key_file.json at the
project root). An error from TorchServe is printed as its status and message, with exit code 1.

TorchServe keeps no record of earlier defaults, so set-default pushes the version it replaces onto
a stack per model in <home>/.default_versions_history.json; rollback pops it.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import requests

from scripts.serving.ts_client import TorchServeClient, TorchServeError

HISTORY_FILE = ".default_versions_history.json"


class ManageError(RuntimeError):
    """A request that cannot be carried out, said plainly (no history to roll back to...)."""


# -- reading the server's state ----------------------------------------------------------------
def describe_versions(client: TorchServeClient, name: str) -> List[dict]:
    """TorchServe's description of every registered version of ``name``.
    (GET /models/NAME describes the default version only; /all lists them all, unmarked.)"""
    return client._json("management", "GET", f"/models/{name}/all")


def registered_versions(client: TorchServeClient, name: str) -> List[str]:
    return [d["modelVersion"] for d in sorted_versions(describe_versions(client, name))]


def version_order(version: str) -> tuple:
    """Sort key: 1.0 < 2.0 < 10.0 (TorchServe lists versions in no particular order)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in version.split("."))


def sorted_versions(descriptions: List[dict]) -> List[dict]:
    return sorted(descriptions, key=lambda d: version_order(d["modelVersion"]))


def default_version(client: TorchServeClient, name: str) -> str:
    """The version that /predictions/NAME answers with: the one GET /models/NAME describes."""
    return client.describe(name)[0]["modelVersion"]


def worker_states(description: dict) -> List[str]:
    # TorchServe reports a worker that is still starting as "UNLOADING", a loaded one as "READY".
    return [w.get("status") for w in description.get("workers", [])]


# -- changing it --------------------------------------------------------------------------------
def register(client: TorchServeClient, archive: str, name: Optional[str] = None,
             batch_size: Optional[int] = None, max_batch_delay: Optional[int] = None,
             workers: Optional[int] = None, response_timeout: Optional[int] = None,
             wait: bool = True) -> dict:
    """Register an archive of the server's model store (or a URL it may fetch). Settings left as
    None come from the archive's model-config.yaml; ``wait`` returns once its workers are READY.
    Registering a version never changes which version is the default."""
    params = {"model_name": name, "batch_size": batch_size, "max_batch_delay": max_batch_delay,
              "initial_workers": workers, "response_timeout": response_timeout}
    params = {k: v for k, v in params.items() if v is not None}
    return client.register(archive, synchronous="true" if wait else "false", **params)


def scale(client: TorchServeClient, name: str, min_workers: int, max_workers: Optional[int] = None,
          version: Optional[str] = None, wait: bool = True, timeout_s: float = 300.0) -> dict:
    """Set a version's worker count (the default version's when ``version`` is None).
    TorchServe answers before new workers have loaded their model, so ``wait`` polls describe
    until exactly ``min_workers`` workers are READY."""
    params = {"min_worker": min_workers, "synchronous": "true"}
    if max_workers is not None:
        params["max_worker"] = max_workers
    path = f"/models/{name}" + (f"/{version}" if version else "")
    answer = client._json("management", "PUT", path, params=params)
    if wait:
        deadline = time.monotonic() + timeout_s
        while True:
            states = worker_states(client.describe(name, version)[0])
            if states == ["READY"] * min_workers:
                break
            if time.monotonic() > deadline:
                raise ManageError(f"{name} {version or '(default)'}: workers are {states} after "
                                  f"{timeout_s:.0f} s, expected {min_workers} READY")
            time.sleep(0.5)
    return answer


def unregister(client: TorchServeClient, name: str, version: Optional[str] = None) -> dict:
    """TorchServe refuses (403) to unregister the default version while others are registered."""
    return client.unregister(name, version)


def _put_default(client: TorchServeClient, name: str, version: str) -> dict:
    return client._json("management", "PUT", f"/models/{name}/{version}/set-default")


# -- default versions and their history ---------------------------------------------------------
def history_path_for(home: str) -> str:
    return os.path.join(home, HISTORY_FILE)


def read_history(path: str) -> Dict[str, List[str]]:
    """{model: [earlier defaults, most recent last]}."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def write_history(path: str, history: Dict[str, List[str]]) -> None:
    # Written whole and renamed into place: an interrupted write leaves the old file intact.
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".history-", suffix=".tmp",
                                     delete=False, encoding="utf-8") as f:
        json.dump(history, f, indent=2, sort_keys=True)
    os.replace(f.name, path)


def set_default(client: TorchServeClient, name: str, version: str, history_path: str) -> Optional[str]:
    """Make ``version`` the default of ``name``; the version it replaces goes onto the history
    stack. Returns that previous default, or None when ``version`` already was the default."""
    previous = default_version(client, name)
    if previous == version:
        return None
    _put_default(client, name, version)  # raises on an unknown model or version: nothing recorded
    history = read_history(history_path)
    history.setdefault(name, []).append(previous)
    write_history(history_path, history)
    return previous


def rollback(client: TorchServeClient, name: str, history_path: str) -> Tuple[str, str]:
    """Make the previous default of ``name`` the default again: (replaced, restored). Earlier
    defaults that are no longer registered, or that are the current default, are skipped."""
    history = read_history(history_path)
    stack = history.get(name, [])
    current = default_version(client, name)
    registered = set(registered_versions(client, name))
    skipped = []
    while stack and (stack[-1] not in registered or stack[-1] == current):
        skipped.append(stack.pop())
    if not stack:
        if skipped:
            write_history(history_path, history)
        detail = (f" (skipped {', '.join(skipped)}: not registered or already the default)"
                  if skipped else "")
        raise ManageError(f"no earlier default version of {name} to roll back to in "
                          f"{history_path}{detail}; {current} stays the default")
    restored = stack[-1]
    _put_default(client, name, restored)
    stack.pop()
    write_history(history_path, history)
    return current, restored


def enforce_default_versions(client: TorchServeClient,
                             defaults: Dict[str, str]) -> Dict[str, Tuple[str, str]]:
    """Make each model's configured default version the served default. TorchServe 0.12 ignores
    config.properties' defaultVersion at start (the first version loaded wins), so `make serve`
    calls this once the server is ready. Models that are not registered, or have a single version,
    are left alone. Returns {model: (default found, default set)} for the models it changed."""
    changed = {}
    for name, wanted in defaults.items():
        try:
            versions = registered_versions(client, name)
        except TorchServeError as exc:
            if exc.status == 404:
                continue
            raise
        if len(versions) < 2:
            continue
        if wanted not in versions:
            raise ManageError(f"the configured default version {wanted} of {name} is not "
                              f"registered (registered: {', '.join(versions)})")
        current = default_version(client, name)
        if current != wanted:
            _put_default(client, name, wanted)
            changed[name] = (current, wanted)
    return changed


# -- command line -------------------------------------------------------------------------------
def list_rows(client: TorchServeClient) -> List[dict]:
    """One row per registered version: model, version, default, workers, batching, archive."""
    rows = []
    for model in client.list_models():
        name = model["modelName"]
        default = default_version(client, name)
        for d in sorted_versions(describe_versions(client, name)):
            states = worker_states(d)
            rows.append({"model": name, "version": d["modelVersion"],
                         "default": d["modelVersion"] == default,
                         "ready": states.count("READY"), "workers": len(states),
                         "min": d["minWorkers"], "max": d["maxWorkers"], "batch": d["batchSize"],
                         "delay_ms": d["maxBatchDelay"], "archive": d["modelUrl"]})
    return rows


def format_rows(rows: List[dict]) -> str:
    header = f"{'model':<16} {'version':<8} {'default':<7} {'ready/workers':<13} {'min-max':<7} " \
             f"{'batch':<5} {'delay ms':<8} archive"
    lines = [header]
    for r in rows:
        lines.append(f"{r['model']:<16} {r['version']:<8} {'*' if r['default'] else '':<7} "
                     f"{r['ready']}/{r['workers']:<11} {r['min']}-{r['max']:<5} {r['batch']:<5} "
                     f"{r['delay_ms']:<8} {r['archive']}")
    return "\n".join(lines)


def project_defaults() -> Tuple[str, str, str]:
    """(inference URL, management URL, home) of `make serve`'s server."""
    from scripts.serving.ts_server import project_server
    server = project_server()
    return server.inference_url, server.management_url, server.cwd


def parse_args(argv=None) -> argparse.Namespace:
    def server_options(parser, default):
        parser.add_argument("--inference-url", default=default,
                            help="default: config.properties' inference_address")
        parser.add_argument("--management-url", default=default,
                            help="default: config.properties' management_address")
        parser.add_argument("--home", default=default,
                            help="folder holding the server's key_file.json and the default "
                                 "versions history (default: the project root)")

    # The server options are accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    server_options(common, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="python -m scripts.serving.manage",
                                     description=__doc__.split("\n\n")[0])
    server_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        return sub.add_parser(name, help=help, parents=[common])

    command("list", "every registered model version, its workers and batching")
    cmd = command("describe", "TorchServe's description (every version if none named)")
    cmd.add_argument("name")
    cmd.add_argument("version", nargs="?")
    cmd = command("register", "register an archive of the model store")
    cmd.add_argument("archive", help="a .mar file name in the server's model store, or a URL")
    cmd.add_argument("--name", help="model name (default: the archive's)")
    cmd.add_argument("--batch-size", type=int, help="default: the archive's model-config.yaml")
    cmd.add_argument("--max-batch-delay", type=int, help="milliseconds")
    cmd.add_argument("--workers", type=int, help="initial workers")
    cmd.add_argument("--response-timeout", type=int, help="seconds")
    cmd.add_argument("--no-wait", action="store_true", help="return before the workers are READY")
    cmd = command("scale", "set a version's worker count (default version if none)")
    cmd.add_argument("name")
    cmd.add_argument("version", nargs="?")
    cmd.add_argument("--min", type=int, required=True, dest="min_workers")
    cmd.add_argument("--max", type=int, dest="max_workers")
    cmd.add_argument("--no-wait", action="store_true", help="return before the workers are READY")
    cmd = command("set-default", "make VERSION what /predictions/NAME serves")
    cmd.add_argument("name")
    cmd.add_argument("version")
    cmd = command("rollback", "make the previous default version the default again")
    cmd.add_argument("name")
    cmd = command("unregister", "unregister a version (the model if it has only one)")
    cmd.add_argument("name")
    cmd.add_argument("version", nargs="?")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, client: TorchServeClient, history_path: str) -> int:
    if args.command == "list":
        print(format_rows(list_rows(client)))
    elif args.command == "describe":
        if args.version:
            print(json.dumps(client.describe(args.name, args.version), indent=2))
        else:
            print(json.dumps({"default_version": default_version(client, args.name),
                              "versions": sorted_versions(describe_versions(client, args.name))},
                             indent=2))
    elif args.command == "register":
        answer = register(client, args.archive, args.name, args.batch_size, args.max_batch_delay,
                          args.workers, args.response_timeout, wait=not args.no_wait)
        print(answer.get("status", answer))
    elif args.command == "scale":
        answer = scale(client, args.name, args.min_workers, args.max_workers, args.version,
                       wait=not args.no_wait)
        print(answer.get("status", answer))
    elif args.command == "set-default":
        previous = set_default(client, args.name, args.version, history_path)
        print(f"{args.name}: {args.version} was already the default" if previous is None
              else f"{args.name}: default version {previous} -> {args.version}")
    elif args.command == "rollback":
        replaced, restored = rollback(client, args.name, history_path)
        print(f"{args.name}: default version {replaced} -> {restored} (rolled back)")
    elif args.command == "unregister":
        answer = unregister(client, args.name, args.version)
        print(answer.get("status", answer))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.inference_url and args.management_url and args.home):
        try:
            inference_url, management_url, home = project_defaults()
        except OSError as exc:
            print(f"error: cannot read the project's server settings: {exc}", file=sys.stderr)
            return 1
        args.inference_url = args.inference_url or inference_url
        args.management_url = args.management_url or management_url
        args.home = args.home or home
    client = TorchServeClient(args.inference_url, args.management_url, home=args.home)
    try:
        return run(args, client, history_path_for(args.home))
    except TorchServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ManageError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except requests.ConnectionError:
        print(f"error: no TorchServe answers at {args.management_url} (is it running? make serve)",
              file=sys.stderr)
    except (requests.RequestException, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
