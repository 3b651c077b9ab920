"""The tuned profile of `make tune` (scripts/bench/tune.py) and how `make serve` (scripts/serving/serve.py) uses it.

A profile is one JSON file per machine, build/tuned/<key>.json, keyed by what decides the best
setting: the CPU's instruction set as torch dispatches on it (torch.backends.cpu.get_cpu_capability():
AVX512, AVX2, ...), the cores this process may use, the GPU model (or none) and torch's version. For
every tuned model it records the two settings picked among everything measured (the throughput
pick, highest throughput whose p99 stays within the catalog's tuning.latency_budget_ms, and the
latency pick, lowest p50 at concurrency 1), each naming the archive (one of the model's catalog
archives that passed its fidelity gate, with its sha256), batchSize, maxBatchDelay, workers and
threads per worker, with its figures; and the whole table it chose from.

The profile only picks among the catalog's gated archives and settings: it never relaxes a gate,
and an archive that is missing (never built, or refused by its gate at build), modified since the
build (SHA256SUMS), stale (built from another catalog entry than today's) or whose recorded fidelity
figures fail today's gate is never tuned nor served from a profile.

TorchServe 0.12 applies an archive's own model-config.yaml batchSize, maxBatchDelay and workers over
config.properties' models= settings at start, and the worker reads its thread count from that file
too (handler.runtime.threads). A tuned setting is therefore served from a *tuned copy* of the gated
archive: the same files, model-config.yaml's serving keys and handler.runtime.threads set to the
tuned values and handler.meta.tuned naming where they came from (the describe API with
?customized=true shows it). The tuner measures exactly such copies, and `make serve` makes them
again from model_store/ at start (.serve/store/<archive>-tuned.mar) and loads each under the
model's own name (load_models=<name>=<copy>.mar).

Pure helpers (no server): machine key, candidate checks, selection, archive copies, config text.
"""
import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from models.catalog import (MODEL_STORE, ROOT, Catalog, CatalogError, ModelEntry,
                             render_config_properties)

PROFILE_DIR = os.path.join(ROOT, "build", "tuned")
FORMAT = 1
TIE_TOLERANCE = 0.02    # throughputs within 2% of the best are a tie (run-to-run noise is larger)
MODES = ("throughput", "latency")
SUMS_FILE = "SHA256SUMS"
TUNED_SUFFIX = "-tuned"


class ProfileError(ValueError):
    pass


# -- the machine's key ---------------------------------------------------------------------------
def available_cores() -> int:
    """The cores a worker may use, as handler_kit.runtime counts them (affinity, cgroup quota)."""
    from handler_kit import runtime  # installed with the project (pyproject.toml)
    return runtime.available_cores()


def machine_facts() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": available_cores(),
            "gpu": gpu, "torch": torch.__version__}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "none"


def profile_key(facts: dict) -> str:
    """'avx512-2cores-nogpu-torch2.14.1-cu130', say: a file name, the same on every run."""
    gpu = "nogpu" if facts["gpu"] in (None, "", "none") else f"gpu-{_slug(facts['gpu'])}"
    return f"{_slug(facts['cpu_capability'])}-{int(facts['cores'])}cores-{gpu}-torch{_slug(facts['torch'])}"


def profile_path(key: str, folder: str = PROFILE_DIR) -> str:
    return os.path.join(folder, f"{key}.json")


# -- candidates: the gated archives of a model ---------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    entry: ModelEntry
    status: str                # ok | missing | modified | stale | refused
    reason: str = ""
    sha256: str = ""
    order: int = 0             # catalog order among the model's archives (fp32 first)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict:
        return {"archive": self.entry.mar_name, "variant": self.entry.variant, "status": self.status,
                "reason": self.reason, "sha256": self.sha256}


def read_sums(store: str) -> Dict[str, str]:
    from scripts.build.verify_archives import read_sums as read
    path = os.path.join(store, SUMS_FILE)
    return read(path) if os.path.isfile(path) else {}


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def archive_handler(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        return (yaml.safe_load(archive.read("model-config.yaml")) or {}).get("handler") or {}


def stale_reason(entry: ModelEntry, handler: dict) -> str:
    """Why the archive's handler section is not what today's catalog entry builds ("" if it is):
    its name, version or variant, or any handler setting (image, runtime, model...) differs."""
    meta = handler.get("meta") or {}
    for key, wanted in (("name", entry.name), ("version", entry.version), ("variant", entry.variant)):
        if str(meta.get(key)) != str(wanted):
            return f"built as {key} {meta.get(key)!r}, the catalog says {wanted!r}"
    for key, wanted in entry.handler_config.items():
        found = handler.get(key)
        if key == "model" and isinstance(found, dict):  # the build adds weights/format/quantization
            found = {k: found.get(k) for k in wanted if k != "weights"}
            wanted = {k: v for k, v in wanted.items() if k != "weights"}
        if found != wanted:
            return f"handler.{key} differs from the catalog's (rebuild it: make build)"
    return ""


def gate_reason(entry: ModelEntry, handler: dict) -> str:
    """"" when the archive's recorded fidelity figures pass today's catalog gate (an fp32 archive
    of untransformed weights is the reference itself); else what failed."""
    from scripts.build.fidelity import FidelityError, check
    figures = (handler.get("meta") or {}).get("fidelity")
    if entry.variant == "fp32" and not entry.transform:
        return ""
    if not figures:
        return "carries no fidelity figures (handler.meta.fidelity): its gate was never passed"
    try:
        check(entry.fidelity, figures, entry.mar_name)
    except FidelityError as exc:
        return f"fails its fidelity gate: {exc}"
    except (KeyError, TypeError) as exc:
        return f"fidelity figures do not fit the catalog's gate ({type(exc).__name__}: {exc})"
    return ""


def check_candidate(entry: ModelEntry, store: str, sums: Dict[str, str], order: int = 0) -> Candidate:
    path = os.path.join(store, entry.mar_name)
    if not os.path.isfile(path):
        return Candidate(entry, "missing", "not in the model store (refused by its fidelity gate at "
                                           "build, or not built: make build)", order=order)
    sha = sha256_file(path)
    if sums.get(entry.mar_name) != sha:
        why = "not listed in" if entry.mar_name not in sums else "differs from"
        return Candidate(entry, "modified", f"its sha256 {why} {SUMS_FILE} (not what the build made)",
                         sha, order)
    try:
        handler = archive_handler(path)
    except (KeyError, zipfile.BadZipFile, yaml.YAMLError) as exc:
        return Candidate(entry, "stale", f"unreadable model-config.yaml: {exc}", sha, order)
    reason = stale_reason(entry, handler)
    if reason:
        return Candidate(entry, "stale", reason, sha, order)
    reason = gate_reason(entry, handler)
    if reason:
        return Candidate(entry, "refused", reason, sha, order)
    return Candidate(entry, "ok", "", sha, order)


def model_archives(catalog: Catalog, name: str) -> List[ModelEntry]:
    """The default version's archives of ``name``: itself (fp32) and its variants, catalog order.
    Other versions (digits 2.0) are other models' weights, never a variant of it."""
    default = catalog.model(name)
    return [e for e in catalog.models if e.base == name and e.version == default.version]


def candidates(catalog: Catalog, name: str, store: str = MODEL_STORE) -> List[Candidate]:
    sums = read_sums(store)
    return [check_candidate(e, store, sums, i) for i, e in enumerate(model_archives(catalog, name))]


# -- selection -----------------------------------------------------------------------------------
def usable(row: dict) -> bool:
    """Measured, without a single error, with latency figures."""
    return (not row.get("failure") and not row.get("errors") and (row.get("throughput") or 0) > 0
            and row.get("p50_ms") is not None and row.get("p99_ms") is not None)


def _cost(row: dict) -> tuple:
    """Tie-breakers after latency: fewer cores, fewer workers (memory), smaller batches, shorter
    delays, the catalog's order of archives (fp32 first)."""
    return (row["workers"] * row["threads"], row["workers"], row["batch_size"], row["max_batch_delay_ms"],
            row.get("order", 0))


def choose_throughput(rows: Sequence[dict], budget_ms: float,
                      tie: float = TIE_TOLERANCE) -> Tuple[Optional[dict], str]:
    """(the row, a note). The highest throughput among the rows whose p99 is within the budget;
    throughputs within ``tie`` of it are a tie, broken by the lower p99, then the lower cost. When
    no row is within the budget, the row of the lowest p99 (closest to it), with a warning: the
    catalog's own setting is among the rows measured, so it did no better. None when no row is
    usable at all (every one failed or had errors): the model keeps its catalog setting."""
    pool = [r for r in rows if usable(r)]
    if not pool:
        return None, "no setting was measured without errors: the catalog's setting stays"
    within = [r for r in pool if r["p99_ms"] <= budget_ms]
    if not within:
        best = min(pool, key=lambda r: (r["p99_ms"], -r["throughput"], _cost(r)))
        return best, (f"WARNING: no setting kept p99 within the {budget_ms:g} ms budget; chose the "
                      f"lowest p99 ({best['p99_ms']:.1f} ms)")
    top = max(r["throughput"] for r in within)
    tied = [r for r in within if r["throughput"] >= top * (1 - tie)]
    best = min(tied, key=lambda r: (r["p99_ms"], _cost(r), -r["throughput"]))
    note = f"highest throughput with p99 within {budget_ms:g} ms"
    if len(tied) > 1:
        note += f" ({len(tied)} within {tie:.0%} of it: the lowest p99 of those)"
    return best, note


def choose_latency(rows: Sequence[dict]) -> Tuple[Optional[dict], str]:
    """The lowest p50 at concurrency 1 (ties: lower p99, then lower cost)."""
    pool = [r for r in rows if usable(r) and r.get("concurrency") == 1]
    if not pool:
        return None, "no concurrency-1 setting was measured without errors"
    best = min(pool, key=lambda r: (round(r["p50_ms"], 2), r["p99_ms"], _cost(r)))
    return best, "lowest p50 at concurrency 1"


# -- tuned archive copies ------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    batch_size: int
    max_batch_delay_ms: int
    workers: int
    threads: int

    def serving(self, base: dict) -> dict:
        return {**base, "minWorkers": self.workers, "maxWorkers": self.workers,
                "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay_ms}

    def label(self) -> str:
        return f"b{self.batch_size}-d{self.max_batch_delay_ms}-w{self.workers}-t{self.threads}"

    @classmethod
    def of(cls, row: dict) -> "Setting":
        return cls(int(row["batch_size"]), int(row["max_batch_delay_ms"]), int(row["workers"]),
                   int(row["threads"]))


def derive_archive(source: str, target: str, setting: Setting, provenance: dict) -> str:
    """``target``: ``source`` with model-config.yaml's serving keys and handler.runtime.threads set
    to ``setting`` and handler.meta.tuned = provenance; every other file byte for byte (stored,
    not deflated: a working copy, made in a second). Returns its sha256."""
    tmp = target + ".tmp"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model-config.yaml":
                data = tuned_model_config(data, setting, provenance)
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr = info.external_attr
            dst.writestr(out, data)
    os.replace(tmp, target)
    return sha256_file(target)


def tuned_model_config(text: bytes, setting: Setting, provenance: dict) -> bytes:
    config = yaml.safe_load(text)
    config.update(setting.serving({}))
    handler = config["handler"]
    handler.setdefault("runtime", {})["threads"] = setting.threads
    handler.setdefault("meta", {})["tuned"] = {**provenance, "setting": setting.label(),
                                               "threads": setting.threads}
    head = "# A tuned copy (scripts/serving/tuned_profile.py) of an archive built by scripts/build/build_archives.py.\n"
    return (head + yaml.safe_dump(config, sort_keys=False)).encode("utf-8")


def tuned_archive_name(entry: ModelEntry) -> str:
    return f"{entry.mar_name[:-len('.mar')]}{TUNED_SUFFIX}.mar"


# -- the profile on disk -------------------------------------------------------------------------
def write_profile(profile: dict, folder: str = PROFILE_DIR) -> str:
    os.makedirs(folder, exist_ok=True)
    path = profile_path(profile["key"], folder)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_profile(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            profile = json.load(f)
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read the tuned profile {path}: {exc}") from None
    if not isinstance(profile, dict) or profile.get("format") != FORMAT or "models" not in profile:
        raise ProfileError(f"{path} is not a tuned profile of format {FORMAT} (run `make tune` again)")
    return profile


def resolve(spec: str, folder: str = PROFILE_DIR, key: Optional[str] = None) -> Tuple[Optional[str], str]:
    """`make serve PROFILE=...` -> (profile path or None, mode). auto/throughput: this machine's
    profile if there is one; latency: its latency picks; none: no profile; a .json path: that file
    (its throughput picks). ProfileError where an explicit request cannot be met."""
    spec = (spec or "auto").strip()
    if spec.lower() == "none":
        return None, "none"
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise ProfileError(f"PROFILE={spec}: no such file")
        return spec, "throughput"
    if spec not in ("auto", *MODES):
        raise ProfileError(f"PROFILE={spec}: one of auto, throughput, latency, none or a profile's .json path")
    path = profile_path(key or profile_key(machine_facts()), folder)
    if os.path.isfile(path):
        return path, "throughput" if spec == "auto" else spec
    if spec == "auto":
        return None, "none"
    raise ProfileError(f"PROFILE={spec}: no tuned profile for this machine ({path}); run `make tune`")


@dataclass(frozen=True)
class Choice:
    """One model served with a tuned setting."""
    entry: ModelEntry          # the archive's catalog entry (a variant, or the model itself)
    setting: Setting
    figures: dict              # the row it was picked by
    source_sha256: str

    @property
    def served_entry(self) -> ModelEntry:
        """The catalog's default entry of the model, served from the tuned copy with the tuned
        serving settings (name, version and default stay the model's)."""
        return replace(self.entry, name=self.entry.base, archive=tuned_archive_name(self.entry)[:-4],
                       serving=self.setting.serving(self.entry.serving), is_default=True,
                       load_at_start=True)


def choices(profile: dict, mode: str, catalog: Catalog,
            store: str = MODEL_STORE) -> Tuple[Dict[str, Choice], List[str]]:
    """The profile's picks that may be served today: {model: Choice}, and one line per model left
    on its catalog setting and why (archive modified since tuning, refused by today's gate...)."""
    out, problems = {}, []
    sums = read_sums(store)
    for name, tuned in sorted(profile.get("models", {}).items()):
        pick = (tuned or {}).get(mode)
        if not pick:
            problems.append(f"{name}: the profile has no {mode} pick; catalog setting")
            continue
        try:
            default = catalog.model(name)
            entry = next(e for e in model_archives(catalog, name) if e.mar_name == pick["archive"])
        except (CatalogError, StopIteration):
            problems.append(f"{name}: {pick.get('archive')} is not an archive of {name}'s default version "
                            f"in today's catalog; catalog setting")
            continue
        if not default.load_at_start:
            continue
        candidate = check_candidate(entry, store, sums)
        if not candidate.ok:
            problems.append(f"{name}: {entry.mar_name} is {candidate.status} ({candidate.reason}); "
                            f"catalog setting")
            continue
        if candidate.sha256 != pick.get("sha256"):
            problems.append(f"{name}: {entry.mar_name} changed since it was tuned (sha256); catalog "
                            f"setting (run `make tune` again)")
            continue
        out[name] = Choice(entry, Setting.of(pick), pick, candidate.sha256)
    return out, problems


def served_catalog(catalog: Catalog, picked: Dict[str, Choice]) -> Catalog:
    """The catalog as served: each tuned model's default version replaced by its tuned copy."""
    models = [picked[m.name].served_entry if m.is_default and m.name in picked else m
              for m in catalog.models]
    return Catalog(server=catalog.server, models=models, deploy=catalog.deploy)


def render_tuned_config(catalog: Catalog, picked: Dict[str, Choice], model_store: str,
                        header: Sequence[str] = (), overrides: Optional[dict] = None) -> str:
    """config.properties for a server of the tuned copies in ``model_store``: the catalog's
    settings and models, each tuned model loaded from its copy under its own name
    (load_models=<name>=<copy>.mar) with the tuned settings in models=."""
    served = served_catalog(catalog, picked)
    ordered = sorted(served.loaded_at_start, key=lambda m: not m.is_default)
    load = ",".join(f"{m.name}={m.mar_name}" if m.is_default and m.name in picked else m.mar_name
                    for m in ordered)
    settings = {"model_store": model_store, "load_models": load, **(overrides or {})}
    text = render_config_properties(served, settings, header=False)
    return "".join(f"# {line}\n" for line in header) + text


def prepare_store(picked: Dict[str, Choice], store_dir: str, provenance: dict,
                  source_store: str = MODEL_STORE) -> Dict[str, str]:
    """``store_dir``: a link to every archive of ``source_store`` (so that scripts/serving/manage.py can
    register any of them) and the tuned copy of each pick. Returns {model: copy's path}."""
    os.makedirs(store_dir, exist_ok=True)
    for name in os.listdir(store_dir):
        path = os.path.join(store_dir, name)
        if os.path.islink(path) or name.endswith(".mar"):
            os.remove(path)
    for name in sorted(os.listdir(source_store)):
        if name.endswith(".mar"):
            os.symlink(os.path.join(os.path.abspath(source_store), name), os.path.join(store_dir, name))
    out = {}
    for model, choice in picked.items():
        target = os.path.join(store_dir, tuned_archive_name(choice.entry))
        derive_archive(os.path.join(source_store, choice.entry.mar_name), target, choice.setting,
                       {**provenance, "source": choice.entry.mar_name, "source_sha256": choice.source_sha256})
        out[model] = target
    return out


def describe_pick(pick: dict) -> str:
    """'digits_int8.mar, batch 16, delay 5 ms, 2 workers x 1 thread: 3,512 req/s, p50 3.1 ms,
    p99 9.8 ms at 16 connections'"""
    workers = f"{pick['workers']} worker{'s' if pick['workers'] != 1 else ''}"
    threads = f"{pick['threads']} thread{'s' if pick['threads'] != 1 else ''}"
    return (f"{pick['archive']}, batch {pick['batch_size']}, delay {pick['max_batch_delay_ms']} ms, "
            f"{workers} x {threads}: {pick['throughput']:,.0f}/s, p50 {pick['p50_ms']:.1f} ms, "
            f"p99 {pick['p99_ms']:.1f} ms at {pick['concurrency']} connection"
            f"{'s' if pick['concurrency'] != 1 else ''}")
