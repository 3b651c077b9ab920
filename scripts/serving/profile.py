"""Profile a served model's next requests with torch.profiler, without restarting TorchServe.

    python -m scripts.serving.profile digits --requests 16 --wait
    python -m scripts.serving.profile efficientnet_lite0 --requests 8 --activities cpu,cuda --record-shapes --wait

Drops the request file <dir>/<model>.json that the model's workers look for before each batch
(handlers/handler_kit/profiling.py). One worker claims it, profiles batches until that many
requests have gone through and writes <dir>/<model>-<timestamp>/ (trace.json for
chrome://tracing or https://ui.perfetto.dev, key_averages.txt, summary.json); the switch is then
off again. With --wait this prints that folder and the top operators once they are written.

<dir> is $TS_HANDLER_PROFILE_DIR, else build/profiles in the project root: where the workers of
`make serve` look (its TorchServe runs in the project root).
"""
import argparse
import glob
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from handler_kit.profiling import (ACTIVITIES, DEFAULT_SUBDIR, ENV_PROFILE_DIR, ProfileRequestError,
                                   parse_request, request_path)
from models.catalog import ROOT


class ProfileFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class ProfileResult:
    folder: str
    summary: dict


def default_dir(environ=None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_PROFILE_DIR) or os.path.join(ROOT, DEFAULT_SUBDIR)


def write_request(trigger_dir: str, model: str, requests: int, activities=("cpu",),
                  record_shapes: bool = False) -> str:
    """Switch profiling on for ``model``; returns the request's tag, which its results carry."""
    tag = uuid.uuid4().hex[:12]
    request = {"requests": requests, "activities": list(activities), "record_shapes": record_shapes,
               "tag": tag}
    parse_request(request)  # the worker's own check, so that a typo is refused here
    os.makedirs(trigger_dir, exist_ok=True)
    path = request_path(trigger_dir, model)
    if os.path.exists(path):
        raise FileExistsError(f"{path} is already waiting for a worker of {model}; "
                              "remove it to cancel that request")
    partial = os.path.join(trigger_dir, f".{model}.json.{os.getpid()}.partial")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(request, f)
    os.replace(partial, path)  # a worker never reads a half-written request
    return tag


def _tag_of(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("tag")
    except (OSError, ValueError, AttributeError):
        return None


def find_result(trigger_dir: str, model: str, tag: str) -> Optional[ProfileResult]:
    """The finished profile of request ``tag``; ProfileFailed if it failed or was rejected."""
    if _tag_of(request_path(trigger_dir, model) + ".rejected") == tag:
        raise ProfileFailed(f"the worker rejected the request {request_path(trigger_dir, model)}; "
                            "the reason is in TorchServe's model_log.log")
    for folder in sorted(glob.glob(os.path.join(glob.escape(trigger_dir), f"{glob.escape(model)}-*"))):
        if _tag_of(os.path.join(folder, "request.json")) != tag:
            continue
        if os.path.exists(os.path.join(folder, "error.txt")):
            with open(os.path.join(folder, "error.txt"), encoding="utf-8") as f:
                raise ProfileFailed(f"profiling failed in the worker ({folder}): {f.read().strip()}")
        summary_path = os.path.join(folder, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                return ProfileResult(folder, json.load(f))
    return None


def wait_for_profile(trigger_dir: str, model: str, tag: str, timeout_s: float,
                     poll_s: float = 0.5) -> ProfileResult:
    deadline = time.monotonic() + timeout_s
    while True:
        result = find_result(trigger_dir, model, tag)
        if result is not None:
            return result
        if time.monotonic() > deadline:
            path = request_path(trigger_dir, model)
            if _tag_of(path) == tag:  # never claimed: take the switch back rather than leave it armed
                os.remove(path)
                raise TimeoutError(f"no worker of {model} picked up {path} in {timeout_s:.0f} s "
                                   f"(request withdrawn). Is {model} served, with a handler that "
                                   f"profiles, by workers that look in {trigger_dir} ({ENV_PROFILE_DIR}, "
                                   f"else build/profiles where TorchServe was started)?")
            raise TimeoutError(f"a worker of {model} is profiling, but fewer requests than asked "
                               f"arrived in {timeout_s:.0f} s; the trace is written once they have")
        time.sleep(poll_s)


def format_top_ops(summary: dict) -> str:
    lines = [f"{'self ms':>10} {'total ms':>10} {'calls':>7}  operator"]
    for op in summary.get("top_ops", []):
        lines.append(f"{op['self_ms']:>10.3f} {op['total_ms']:>10.3f} {op['calls']:>7}  {op['name']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, required=True, help="how many requests to profile")
    parser.add_argument("--activities", default="cpu",
                        help=f"comma-separated, of {', '.join(ACTIVITIES)} (default cpu)")
    parser.add_argument("--record-shapes", action="store_true", help="record operator input shapes")
    parser.add_argument("--dir", default=default_dir(), help="the workers' profile folder (default %(default)s)")
    parser.add_argument("--wait", action="store_true", help="wait for the trace, then print it")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
    args = parser.parse_args(argv)
    try:
        tag = write_request(args.dir, args.model, args.requests, args.activities.split(","),
                            args.record_shapes)
    except (ProfileRequestError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"requested a profile of the next {args.requests} requests of {args.model}: "
          f"{request_path(args.dir, args.model)}")
    if not args.wait:
        print(f"the trace will be written to {os.path.join(args.dir, args.model)}-<timestamp>/")
        return 0
    try:
        result = wait_for_profile(args.dir, args.model, tag, args.timeout)
    except (ProfileFailed, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = result.summary
    print(f"{summary['requests']} requests in {summary['batches']} batches profiled by worker pid "
          f"{summary['pid']}:\n  {os.path.join(result.folder, summary['trace'])}\n"
          f"  {os.path.join(result.folder, summary['table'])}\n")
    print(format_top_ops(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
