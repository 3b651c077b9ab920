"""`make serve` / `make stop`: the project's TorchServe on the addresses in config.properties.

    python -m scripts.serving.serve start [--profile auto|throughput|latency|none|PATH.json]
                                    # start (or find running), wait until every model is READY
    python -m scripts.serving.serve stop
    python -m scripts.serving.serve key inference|management   # a valid key, renewed if expired
"""
import argparse
import contextlib
import os
import sys
import time

from scripts.serving import tuned_profile
from models.catalog import CONFIG_PROPERTIES_PATH, MODEL_STORE, ROOT, Catalog, load_catalog
from scripts.serving.manage import enforce_default_versions, history_path_for
from scripts.serving.ts_client import TorchServeError
from scripts.serving.ts_server import SERVER_HOME, TorchServe, check_java, project_server  # noqa: F401

def _shown(path: str) -> str:
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def server_config(catalog: Catalog, profile: str = "auto", profile_dir: str = tuned_profile.PROFILE_DIR,
                  key=None, model_store: str = MODEL_STORE, home: str = SERVER_HOME) -> str:
    """The configuration file to start with, saying which tuned profile is in use (path and key)
    and each tuned model's setting, or that none is. Without a profile (or with PROFILE=none):
    config.properties itself, exactly as without tuning. With one: <home>/config.properties,
    rendered from the catalog with each tuned model loaded under its own name from its tuned copy
    in <home>/store. Raises tuned_profile.ProfileError where an explicit PROFILE cannot be met."""
    if profile.strip().lower() == "none":
        print("tuned profile: none (PROFILE=none): the catalog's settings")
        return CONFIG_PROPERTIES_PATH
    here = key or tuned_profile.profile_key(tuned_profile.machine_facts())
    path, mode = tuned_profile.resolve(profile, profile_dir, here)
    if path is None:
        print(f"tuned profile: none for this machine ({_shown(tuned_profile.profile_path(here, profile_dir))} "
              f"does not exist; `make tune` writes it): the catalog's settings")
        return CONFIG_PROPERTIES_PATH
    try:
        loaded = tuned_profile.load_profile(path)
    except tuned_profile.ProfileError as exc:
        if profile != "auto":
            raise
        print(f"tuned profile: WARNING {exc}: the catalog's settings")
        return CONFIG_PROPERTIES_PATH
    print(f"tuned profile: {_shown(path)} (key {loaded['key']}; {mode} picks; `make tune"
          f"{' --quick' if loaded.get('mode') == 'quick' else ''}` of {loaded.get('created', '?')})")
    if loaded["key"] != here:
        print(f"  WARNING: tuned on another kind of machine (this one is {here})")
    picked, problems = tuned_profile.choices(loaded, mode, catalog, model_store)
    for problem in problems:
        print(f"  {problem}")
    for name, choice in sorted(picked.items()):
        print(f"  {name}: {tuned_profile.describe_pick(choice.figures)}")
    if not picked:
        print("  no tuned setting can be served: the catalog's settings")
        return CONFIG_PROPERTIES_PATH
    store = os.path.join(home, "store")
    tuned_profile.prepare_store(picked, store, {"profile": _shown(path), "key": loaded["key"], "mode": mode},
                                model_store)
    config = os.path.join(home, "config.properties")
    text = tuned_profile.render_tuned_config(catalog, picked, store, header=[
        f"Rendered by `make serve` from models/catalog.yaml and the tuned profile {_shown(path)}",
        f"({mode} picks); config.properties is the catalog's own. Tuned copies in {_shown(store)}."])
    os.makedirs(home, exist_ok=True)
    with open(config, "w", encoding="utf-8") as f:
        f.write(text)
    return config


def start(timeout_s: float, profile: str = "auto") -> int:
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
        try:
            config = server_config(catalog, profile)
        except tuned_profile.ProfileError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        server = TorchServe(SERVER_HOME, config, cwd=ROOT)
        with contextlib.suppress(FileNotFoundError):  # rollbacks belong to the previous run's switches
            os.remove(history_path_for(ROOT))
        print(f"starting TorchServe with {_shown(config)} (logs in "
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
    key_cmd = "$(.venv/bin/python -m scripts.serving.serve key inference)"
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
    start_cmd.add_argument("--profile", default=os.environ.get("PROFILE") or "auto",
                           help="tuned profile: auto (this machine's, if `make tune` wrote one), "
                                "throughput, latency, none, or a profile's .json path")
    sub.add_parser("stop")
    key_cmd = sub.add_parser("key")
    key_cmd.add_argument("kind", choices=("inference", "management"))
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args.timeout, args.profile)
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
