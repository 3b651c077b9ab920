"""Profiles a model's next N requests with torch.profiler on demand, while the server runs.

The switch is a request file, ``<trigger_dir>/<model>.json``, for example
``{"requests": 16, "activities": ["cpu"], "record_shapes": false}``, written by
``python -m scripts.serving.profile MODEL --requests 16``. Before each batch the handler stats that path
(one os.stat, nothing more while the switch is off). A worker that finds the file claims it with
an atomic rename, so that of several workers serving the model only one profiles; it then
records its next batches, only inside ``maybe_profile`` (collection is paused between them), until
N requests have gone through, and writes into ``<trigger_dir>/<model>-<YYYYmmdd-HHMMSS>/``:

    request.json        the request file, moved there: the switch is off again
    trace.json          Chrome trace (chrome://tracing, https://ui.perfetto.dev)
    key_averages.txt    torch.profiler's key_averages table, most expensive first
    summary.json        written last: requests, batches, top operators
    error.txt           instead of summary.json when profiling failed

A request file that cannot be used is renamed ``<model>.json.rejected`` and the reason logged.
Nothing here ever fails a request: profiling errors are logged and the wrapped call goes on.

Where trigger_dir is: $TS_HANDLER_PROFILE_DIR (TorchServe passes its environment to the workers;
set it empty to switch the feature off), else ``build/profiles`` under the directory TorchServe
was started in (the project root for `make serve`), which scripts/serving/profile.py uses by default.
"""
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

ENV_PROFILE_DIR = "TS_HANDLER_PROFILE_DIR"
DEFAULT_SUBDIR = os.path.join("build", "profiles")
REQUEST_KEYS = ("requests", "activities", "record_shapes", "tag")
ACTIVITIES = ("cpu", "cuda")
TOP_OPS = 15
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"


class ProfileRequestError(ValueError):
    """A request file that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ProfileRequest:
    requests: int                        # profile batches until this many requests went through
    activities: Tuple[str, ...] = ("cpu",)
    record_shapes: bool = False          # input shapes per operator (bigger trace, finer table)
    tag: str = ""                        # free text echoed in summary.json (scripts/serving/profile.py's id)


def parse_request(raw) -> ProfileRequest:
    if not isinstance(raw, dict):
        raise ProfileRequestError(f"a profile request must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(REQUEST_KEYS))
    if unknown:
        raise ProfileRequestError(f"unknown key '{unknown[0]}'; allowed keys: {', '.join(REQUEST_KEYS)}")
    count = raw.get("requests")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ProfileRequestError(f"'requests' must be a positive integer, got {count!r}")
    activities = raw.get("activities", ["cpu"])
    if (not isinstance(activities, list) or not activities
            or any(a not in ACTIVITIES for a in activities)):
        raise ProfileRequestError(f"'activities' is {activities!r}; allowed: a non-empty list of "
                                  f"{', '.join(ACTIVITIES)}")
    record_shapes = raw.get("record_shapes", False)
    if not isinstance(record_shapes, bool):
        raise ProfileRequestError(f"'record_shapes' must be true or false, got {record_shapes!r}")
    tag = raw.get("tag", "")
    if not isinstance(tag, str):
        raise ProfileRequestError(f"'tag' must be a string, got {tag!r}")
    return ProfileRequest(count, tuple(dict.fromkeys(activities)), record_shapes, tag)


def request_path(trigger_dir: str, model_name: str) -> str:
    return os.path.join(trigger_dir, f"{model_name}.json")


def started_in() -> str:
    """The directory TorchServe was started in. A worker's own cwd is the model's temporary
    folder; its parent process is the frontend, started where key_file.json and logs/ are."""
    try:
        import psutil  # a TorchServe dependency
        parent = psutil.Process(os.getppid())
        if any(FRONTEND_CLASS in part for part in parent.cmdline()):
            return parent.cwd()
    except Exception:  # noqa: BLE001 (no psutil, no permission: this process's cwd will do)
        pass
    return os.getcwd()


def trigger_dir_from(environ: Mapping[str, str]) -> Optional[str]:
    """$TS_HANDLER_PROFILE_DIR, None (switched off) when it is set empty, else the default."""
    if ENV_PROFILE_DIR in environ:
        return environ[ENV_PROFILE_DIR] or None
    return os.path.join(started_in(), DEFAULT_SUBDIR)


def new_output_dir(trigger_dir: str, model_name: str) -> str:
    stem = os.path.join(trigger_dir, f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for n in range(1000):
        path = stem if n == 0 else f"{stem}-{n}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(stem)


def write_atomically(path: str, text: str) -> None:
    """Readers (scripts/serving/profile.py) never see a half-written file."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def top_operators(averages, by_device: bool, limit: int = TOP_OPS) -> List[dict]:
    """The most expensive operators of a key_averages() list, self time first."""
    def self_us(event):
        return event.self_device_time_total if by_device else event.self_cpu_time_total
    rows = sorted(averages, key=self_us, reverse=True)[:limit]
    return [{"name": e.key, "calls": e.count, "self_ms": round(self_us(e) / 1000.0, 3),
             "total_ms": round((e.device_time_total if by_device else e.cpu_time_total) / 1000.0, 3)}
            for e in rows]


class _Session:
    """One claimed request: a torch profiler kept open across batches, collecting only inside
    them, until the requested number of requests has been covered."""

    def __init__(self, request: ProfileRequest, output_dir: str, model_name: str):
        self.request, self.output_dir, self.model_name = request, output_dir, model_name
        self.covered = 0
        self.batches = 0
        self.activities = [torch.profiler.ProfilerActivity.CPU if a == "cpu"
                           else torch.profiler.ProfilerActivity.CUDA for a in request.activities]
        self.profile = torch.profiler.profile(activities=self.activities,
                                              record_shapes=request.record_shapes)
        self.started = False

    @property
    def uses_cuda(self) -> bool:
        return "cuda" in self.request.activities

    def resume(self) -> None:
        if not self.started:
            self.profile.start()
            self.started = True
        else:
            self.profile.toggle_collection_dynamic(True, self.activities)

    def pause(self, batch_size: int) -> bool:
        """Count the batch; True once enough requests have been covered."""
        if self.uses_cuda:  # kernels still queued would fall outside the collection window
            torch.cuda.synchronize()
        self.batches += 1
        self.covered += batch_size
        done = self.covered >= self.request.requests
        if not done:
            self.profile.toggle_collection_dynamic(False, self.activities)
        return done

    def finish(self) -> None:
        self.profile.stop()
        self.profile.export_chrome_trace(os.path.join(self.output_dir, "trace.json"))
        averages = self.profile.key_averages(group_by_input_shape=self.request.record_shapes)
        sort_by = "self_device_time_total" if self.uses_cuda else "self_cpu_time_total"
        write_atomically(os.path.join(self.output_dir, "key_averages.txt"),
                         averages.table(sort_by=sort_by, row_limit=50))
        summary = {"model": self.model_name, "tag": self.request.tag, "requests": self.covered,
                   "batches": self.batches, "activities": list(self.request.activities),
                   "record_shapes": self.request.record_shapes, "pid": os.getpid(),
                   "trace": "trace.json", "table": "key_averages.txt",
                   "top_ops": top_operators(averages, self.uses_cuda)}
        write_atomically(os.path.join(self.output_dir, "summary.json"), json.dumps(summary, indent=2))

    def abandon(self, error: BaseException) -> None:
        """After a profiler error: stop what can be stopped and leave the reason beside it."""
        if self.started:
            try:
                self.profile.stop()
            except Exception:  # noqa: BLE001 (already failing; the first error is the one to report)
                pass
        try:
            write_atomically(os.path.join(self.output_dir, "error.txt"), f"{type(error).__name__}: {error}\n")
        except OSError:
            pass


class Profiler:
    """The profiling switch of one model in one worker. ``trigger_dir=None``: always off (warm-up,
    or a deployment that switched the feature off)."""

    def __init__(self, trigger_dir: Optional[str], model_name: str):
        self.trigger_dir = trigger_dir
        self.model_name = model_name
        self.request_file = request_path(trigger_dir, model_name) if trigger_dir else None
        self._session: Optional[_Session] = None

    @classmethod
    def from_environment(cls, model_name: str, environ: Optional[Mapping[str, str]] = None) -> "Profiler":
        profiler = cls(trigger_dir_from(os.environ if environ is None else environ), model_name)
        logger.info("profiling switch for %s: %s", model_name, profiler.request_file or "off")
        return profiler

    @contextmanager
    def maybe_profile(self, batch_size: int):
        """Wrap one batch's model call; profiles it when a request file asks for it."""
        session = self._session_for_this_batch()
        if session is not None:
            try:
                session.resume()
            except Exception as exc:  # noqa: BLE001 (profiling must never fail a request)
                self._give_up(session, exc)
                session = None
        try:
            yield
        finally:
            if session is not None:
                self._after_batch(session, batch_size)

    def _session_for_this_batch(self) -> Optional[_Session]:
        if self._session is not None or self.request_file is None:
            return self._session
        try:
            os.stat(self.request_file)
        except OSError:
            return None  # the switch is off: the common case, one stat per batch
        try:
            self._session = self._claim()
        except Exception:  # noqa: BLE001
            logger.exception("profiling %s could not start; requests go on unprofiled", self.model_name)
        return self._session

    def _claim(self) -> Optional[_Session]:
        claimed = f"{self.request_file}.{os.getpid()}.claimed"
        try:  # atomic: of several workers polling the same file, exactly one wins it
            os.rename(self.request_file, claimed)
        except FileNotFoundError:
            return None
        try:
            with open(claimed, encoding="utf-8") as f:
                request = parse_request(json.load(f))
            if "cuda" in request.activities and not torch.cuda.is_available():
                raise ProfileRequestError("'activities' has 'cuda' but this worker sees no GPU")
            output_dir = new_output_dir(self.trigger_dir, self.model_name)
        except (ValueError, OSError) as exc:  # JSONDecodeError and ProfileRequestError included
            os.replace(claimed, self.request_file + ".rejected")
            logger.error("profile request %s rejected (renamed .rejected): %s", self.request_file, exc)
            return None
        os.replace(claimed, os.path.join(output_dir, "request.json"))
        try:
            session = _Session(request, output_dir, self.model_name)
        except Exception as exc:  # noqa: BLE001
            write_atomically(os.path.join(output_dir, "error.txt"), f"{type(exc).__name__}: {exc}\n")
            raise
        logger.info("profiling the next %d requests of %s into %s", request.requests,
                    self.model_name, output_dir)
        return session

    def _after_batch(self, session: _Session, batch_size: int) -> None:
        try:
            if session.pause(batch_size):
                self._session = None
                session.finish()
                logger.info("profile of %d requests (%d batches) of %s written to %s", session.covered,
                            session.batches, self.model_name, session.output_dir)
        except Exception as exc:  # noqa: BLE001
            self._give_up(session, exc)

    def _give_up(self, session: _Session, error: Exception) -> None:
        self._session = None
        logger.error("profiling %s failed, requests go on unprofiled: %s", self.model_name, error,
                     exc_info=error)
        session.abandon(error)
