"""`make tune` (scripts/bench/tune.py, scripts/serving/tuned_profile.py) and `make serve`'s use of its profile:
the selection on synthetic measurements, the candidates (never a missing, modified, stale or
refused archive), the profile's key, the tuned archive copies and configuration, serve's choice of
configuration; and one real quick tune of diabetes against a real TorchServe, whose profile is then
served: the tuned copy loaded under the model's own name with the tuned batch size."""
import json
import os
import shutil
import zipfile
from dataclasses import replace

import pytest
import yaml

from scripts.bench import measure
from scripts.bench import loadgen, tune
from scripts.serving import serve
from scripts.serving import tuned_profile as tp
from models.catalog import (CONFIG_PROPERTIES_PATH, Catalog, CatalogError, load_catalog,
                             parse_config_properties)

FACTS = {"cpu_capability": "AVX512", "cores": 2, "gpu": "none", "torch": "2.14.1+cu130"}
KEY = tp.profile_key(FACTS)


def _row(archive="digits.mar", throughput=1000.0, p50=5.0, p99=20.0, batch=8, delay=5, workers=1,
         threads=1, concurrency=16, order=0, **extra):
    return {"stage": "archive", "archive": archive, "variant": "fp32", "order": order, "batch_size": batch,
            "max_batch_delay_ms": delay, "workers": workers, "threads": threads, "concurrency": concurrency,
            "throughput": throughput, "p50_ms": p50, "p99_ms": p99, "errors": 0, "failure": None, **extra}


# -- selection -----------------------------------------------------------------------------------
def test_the_throughput_pick_is_the_highest_throughput_within_the_budget():
    rows = [_row(throughput=3000, p99=60, batch=32),      # fastest, but over the 50 ms budget
            _row(throughput=2500, p99=40, batch=16),
            _row(throughput=1800, p99=10, batch=4)]
    pick, note = tp.choose_throughput(rows, 50)
    assert pick["batch_size"] == 16 and "within 50 ms" in note


def test_ties_go_to_the_lower_p99_then_to_fewer_cores_and_the_catalogs_archive_order():
    rows = [_row(throughput=2000, p99=30, batch=16), _row(throughput=1990, p99=12, batch=8),
            _row(throughput=1500, p99=5, batch=1)]
    pick, note = tp.choose_throughput(rows, 50)
    assert pick["batch_size"] == 8 and "2 within 2%" in note      # 1990 is within 2% of 2000
    exact = [_row("digits_onnx.mar", 2000, p99=10, order=4, workers=2), _row("digits_int8.mar", 2000, p99=10, order=2),
             _row("digits.mar", 2000, p99=10, order=0, threads=2)]
    pick, _ = tp.choose_throughput(exact, 50)
    assert pick["archive"] == "digits_int8.mar"                    # 1 worker x 1 thread: the fewest cores
    same_cost = [_row("digits_onnx.mar", 2000, p99=10, order=4), _row("digits_int8.mar", 2000, p99=10, order=2)]
    assert tp.choose_throughput(same_cost, 50)[0]["archive"] == "digits_int8.mar"  # catalog order


def test_nothing_within_the_budget_picks_the_lowest_p99_with_a_warning():
    rows = [_row(throughput=3000, p99=90), _row(throughput=1000, p99=70), _row(throughput=2000, p99=80)]
    pick, note = tp.choose_throughput(rows, 50)
    assert pick["p99_ms"] == 70 and note.startswith("WARNING: no setting kept p99 within the 50 ms budget")


def test_rows_with_errors_or_failures_are_never_picked():
    rows = [_row(throughput=9000, p99=1, errors=3), _row(throughput=8000, p99=1, failure="worker died"),
            _row(throughput=0, p99=None, p50=None), _row(throughput=100, p99=40)]
    assert tp.choose_throughput(rows, 50)[0]["throughput"] == 100
    pick, note = tp.choose_throughput(rows[:3], 50)
    assert pick is None and "catalog's setting stays" in note


def test_the_latency_pick_is_the_lowest_p50_at_concurrency_one():
    rows = [_row(p50=0.9, concurrency=16), _row("digits_int8.mar", p50=2.0, p99=3, concurrency=1, batch=1),
            _row("digits.mar", p50=1.2, p99=9, concurrency=1, batch=1)]
    pick, _ = tp.choose_latency(rows)
    assert pick["archive"] == "digits.mar" and pick["concurrency"] == 1


# -- the profile's key ---------------------------------------------------------------------------
def test_the_profile_key_names_what_decides_the_setting():
    assert KEY == "avx512-2cores-nogpu-torch2.14.1-cu130"
    others = [{**FACTS, "cpu_capability": "AVX2"}, {**FACTS, "cores": 16},
              {**FACTS, "gpu": "NVIDIA H100 80GB HBM3"}, {**FACTS, "torch": "2.15.0"}]
    keys = {tp.profile_key(f) for f in others}
    assert len(keys) == 4 and KEY not in keys
    assert tp.profile_key(others[2]) == "avx512-2cores-gpu-nvidia-h100-80gb-hbm3-torch2.14.1-cu130"
    assert all(os.path.basename(tp.profile_path(k)) == f"{k}.json" and "/" not in k for k in keys)
    here = tp.machine_facts()
    assert here["cores"] >= 1 and here["cpu_capability"] and tp.profile_key(here) == tp.profile_key(here)


def test_a_catalog_budget_is_validated_naming_the_key(tmp_path):
    raw = yaml.safe_load(open(os.path.join(tp.ROOT, "models", "catalog.yaml"), encoding="utf-8"))
    for bad, message in ((-5, "models[1].tuning.latency_budget_ms must be a number"),
                         ("fast", "models[1].tuning.latency_budget_ms must be a number")):
        broken = json.loads(json.dumps(raw))
        broken["models"][1]["tuning"] = {"latency_budget_ms": bad}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_catalog(str(tmp_path / "c.yaml"))
    broken["models"][1]["tuning"] = {"latency_budget": 5}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(CatalogError, match="tuning: unknown key 'latency_budget'"):
        load_catalog(str(tmp_path / "c.yaml"))
    for goal in (0, 1.5, True, "most"):
        broken["models"][1]["tuning"] = {"latency_budget_ms": 50, "served_goal": goal}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(CatalogError, match=r"models\[1\].tuning.served_goal must be a share in \(0, 1\]"):
            load_catalog(str(tmp_path / "c.yaml"))


# -- candidates ----------------------------------------------------------------------------------
def _rewrite(path, change):
    """The archive with its model-config.yaml changed by ``change`` (a dict -> None)."""
    with zipfile.ZipFile(path) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    config = yaml.safe_load(members["model-config.yaml"])
    change(config)
    members["model-config.yaml"] = yaml.safe_dump(config).encode()
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)


@pytest.fixture
def fake_store(tmp_path, model_store):
    """digits' archives: digits.mar and digits_int8.mar as built; digits_bf16.mar with fidelity
    figures that fail the gate (and a SHA256SUMS that lists it as built); digits_onnx.mar
    modified after the build; digits_torchscript.mar missing (as a variant refused at build is)."""
    store = tmp_path / "store"
    store.mkdir()
    for name in ("digits.mar", "digits_int8.mar", "digits_bf16.mar", "digits_onnx.mar"):
        shutil.copy(os.path.join(model_store, name), store / name)

    def fail_gate(config):
        config["handler"]["meta"]["fidelity"].update(accuracy=0.9, accuracy_drop_points=8.9)
    _rewrite(store / "digits_bf16.mar", fail_gate)
    sums = {n: tp.sha256_file(str(store / n)) for n in ("digits.mar", "digits_int8.mar", "digits_bf16.mar")}
    sums["digits_onnx.mar"] = "0" * 64
    (store / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sums.items()))
    return str(store)


def test_candidates_are_only_the_gated_archives_as_built(catalog, fake_store):
    found = {c.entry.mar_name: c for c in tp.candidates(catalog, "digits", fake_store)}
    assert list(found) == ["digits.mar", "digits_bf16.mar", "digits_int8.mar", "digits_torchscript.mar",
                           "digits_onnx.mar"]                          # never digits_v2.0.mar
    assert {n: c.status for n, c in found.items()} == {
        "digits.mar": "ok", "digits_int8.mar": "ok", "digits_bf16.mar": "refused",
        "digits_torchscript.mar": "missing", "digits_onnx.mar": "modified"}
    assert "8.9 points below" in found["digits_bf16.mar"].reason
    # A gate tightened in the catalog since the build refuses what passed then; never relaxed.
    strict = Catalog(catalog.server, [replace(m, fidelity={**m.fidelity, "max_drop_points": -1.0})
                                      if m.mar_name == "digits_int8.mar" else m for m in catalog.models])
    assert {c.entry.mar_name: c.status for c in tp.candidates(strict, "digits", fake_store)}["digits_int8.mar"] \
        == "refused"
    # An archive built from another catalog entry than today's is stale.
    edited = Catalog(catalog.server, [replace(m, handler_config={**m.handler_config, "topk": 5})
                                      if m.mar_name == "digits_int8.mar" else m for m in catalog.models])
    stale = {c.entry.mar_name: c for c in tp.candidates(edited, "digits", fake_store)}["digits_int8.mar"]
    assert stale.status == "stale" and "handler.topk" in stale.reason


class _FakeTuner:
    """tune_model's measurements, made up: every archive measures the same, except digits_bf16.mar
    (which fails its gate), which would win if it were ever measured."""
    grid = tune.QUICK
    concurrency = 16
    cores = 2

    def __init__(self, catalog, store):
        self.catalog, self.source_store, self.asked = catalog, store, []

    def measure(self, stage, candidate, setting, inputs, concurrency):
        self.asked.append(candidate.entry.mar_name)
        fast = candidate.entry.mar_name == "digits_bf16.mar"
        return tune.row(stage, candidate, setting, concurrency, _measurement(
            setting, concurrency, 99999.0 if fast else 1000.0 + 100 * setting.batch_size))


def _measurement(setting, concurrency, rate):
    m = measure.Measurement("fake", items=int(rate), seconds=1.0, unit="img",
                          latency_percentiles_ms={"p50": 2.0, "p99": 4.0 + setting.batch_size})
    m.settings = {"batch_size": setting.batch_size, "max_batch_delay_ms": setting.max_batch_delay_ms,
                  "workers": setting.workers}
    return m


def test_the_tuner_never_measures_nor_picks_an_archive_outside_the_gate(catalog, fake_store):
    tuner = _FakeTuner(catalog, fake_store)
    tuned = tune.tune_model(tuner, "digits")
    assert set(tuner.asked) == {"digits.mar", "digits_int8.mar"}
    assert tuned["throughput"]["archive"] in ("digits.mar", "digits_int8.mar")
    assert tuned["throughput"]["batch_size"] == 16 and tuned["throughput"]["p99_ms"] <= 50
    assert tuned["latency"]["batch_size"] == 1 and tuned["latency"]["concurrency"] == 1
    assert tuned["throughput"]["sha256"] == tp.sha256_file(os.path.join(fake_store, tuned["throughput"]["archive"]))
    statuses = {c["archive"]: c["status"] for c in tuned["candidates"]}
    assert statuses["digits_bf16.mar"] == "refused" and statuses["digits_torchscript.mar"] == "missing"
    assert {r["stage"] for r in tuned["table"]} == set(tune.STAGES)
    text = "\n".join(tune.table_lines("digits", tuned))
    assert "**throughput pick**" in text and "not a candidate: digits_bf16.mar (refused" in text
    assert "WARNING" not in text
    tuned["table"][0]["foreign_cpu_cores"] = 0.9
    assert "- WARNING: 1 of" in "\n".join(tune.table_lines("digits", tuned))


def test_the_search_grids():
    assert tune.thread_pairs(2) == [(1, 2), (1, 1), (2, 1)]
    assert tune.thread_pairs(1) == [(1, 1)]
    assert (4, 1) in tune.thread_pairs(4) and (2, 2) in tune.thread_pairs(4)
    settings = tune.batching_settings(tune.FULL, tp.Setting(8, 5, 2, 1), 0)
    assert tp.Setting(1, 1, 2, 1) in settings and tp.Setting(32, 20, 2, 1) in settings
    assert all(s.max_batch_delay_ms >= 1 for s in settings)  # 0 would start as 100 ms (TorchServe 0.12)
    quick = tune.batching_settings(tune.QUICK, tp.Setting(8, 5, 2, 1), 20)
    assert quick == [tp.Setting(b, 20, 2, 1) for b in (4, 8, 16)]


# -- tuned copies, configuration, serve ----------------------------------------------------------
def test_a_tuned_copy_changes_the_settings_and_nothing_else(model_store, tmp_path):
    source = os.path.join(model_store, "digits_int8.mar")
    target = str(tmp_path / "digits_int8-tuned.mar")
    tp.derive_archive(source, target, tp.Setting(16, 2, 2, 1), {"profile": "p.json"})
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(target) as b:
        assert a.namelist() == b.namelist()
        changed = [n for n in a.namelist() if a.read(n) != b.read(n)]
        config = yaml.safe_load(b.read("model-config.yaml"))
        before = yaml.safe_load(a.read("model-config.yaml"))
    assert changed == ["model-config.yaml"]
    assert (config["batchSize"], config["maxBatchDelay"], config["minWorkers"], config["maxWorkers"]) == (16, 2, 2, 2)
    assert config["handler"]["runtime"]["threads"] == 1
    assert config["handler"]["meta"].pop("tuned") == {"profile": "p.json", "setting": "b16-d2-w2-t1", "threads": 1}
    for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers"):
        before.pop(key), config.pop(key)
    before["handler"]["runtime"].pop("threads"), config["handler"]["runtime"].pop("threads")
    assert config == before


def _profile(model_store, mode_picks):
    models = {}
    for name, archive, setting in mode_picks:
        pick = {**_row(archive, batch=setting.batch_size, delay=setting.max_batch_delay_ms,
                       workers=setting.workers, threads=setting.threads),
                "sha256": tp.sha256_file(os.path.join(model_store, archive))}
        models[name] = {"throughput": pick, "latency": {**pick, "batch_size": 1, "concurrency": 1}, "table": [pick]}
    return {"format": tp.FORMAT, "key": KEY, "created": "2026-12-06T00:00:00+00:00", "mode": "quick",
            "models": models}


def test_the_tuned_config_loads_each_copy_under_the_models_name(catalog, model_store, tmp_path):
    profile = _profile(model_store, [("digits", "digits_int8.mar", tp.Setting(16, 2, 2, 1)),
                                     ("diabetes", "diabetes.mar", tp.Setting(4, 1, 2, 1))])
    picked, problems = tp.choices(profile, "throughput", catalog, model_store)
    assert problems == [] and set(picked) == {"digits", "diabetes"}
    props = parse_config_properties(tp.render_tuned_config(catalog, picked, str(tmp_path)))
    assert props["load_models"].split(",") == ["efficientnet_lite0.mar", "digits=digits_int8-tuned.mar", "minilm.mar",
                                               "diabetes=diabetes-tuned.mar", "digits_v2.0.mar"]
    models = json.loads(props["models"])
    assert models["digits"]["1.0"] == {"defaultVersion": True, "marName": "digits_int8-tuned.mar", "minWorkers": 2,
                                       "maxWorkers": 2, "batchSize": 16, "maxBatchDelay": 2, "responseTimeout": 30}
    assert models["digits"]["2.0"]["marName"] == "digits_v2.0.mar" and models["digits"]["2.0"]["batchSize"] == 8
    committed = json.loads(parse_config_properties(open(CONFIG_PROPERTIES_PATH).read())["models"])
    assert models["minilm"] == committed["minilm"] and props["model_store"] == str(tmp_path)
    latency, _ = tp.choices(profile, "latency", catalog, model_store)
    assert latency["digits"].setting.batch_size == 1


def test_serve_uses_this_machines_profile_and_says_so(catalog, model_store, tmp_path, capsys):
    profiles, home = tmp_path / "tuned", tmp_path / "home"
    assert serve.server_config(catalog, "auto", str(profiles), KEY, model_store, str(home)) == CONFIG_PROPERTIES_PATH
    assert "tuned profile: none for this machine" in capsys.readouterr().out
    with pytest.raises(tp.ProfileError, match="no tuned profile for this machine"):
        serve.server_config(catalog, "latency", str(profiles), KEY, model_store, str(home))
    picks = [("digits", "digits_int8.mar", tp.Setting(16, 2, 2, 1)), ("diabetes", "diabetes.mar", tp.Setting(4, 1, 2, 1))]
    path = tp.write_profile(_profile(model_store, picks), str(profiles))
    config = serve.server_config(catalog, "auto", str(profiles), KEY, model_store, str(home))
    out = capsys.readouterr().out
    assert config == str(home / "config.properties")
    assert f"tuned profile: {path} (key {KEY}; throughput picks" in out
    assert "  digits: digits_int8.mar, batch 16, delay 2 ms, 2 workers x 1 thread" in out
    props = parse_config_properties(open(config).read())
    assert props["model_store"] == str(home / "store") and "digits=digits_int8-tuned.mar" in props["load_models"]
    stored = sorted(os.listdir(home / "store"))
    assert "digits_int8-tuned.mar" in stored and "minilm_int8.mar" in stored  # links: manage.py registers any
    assert serve.server_config(catalog, "none", str(profiles), KEY, model_store, str(home)) == CONFIG_PROPERTIES_PATH
    assert "PROFILE=none" in capsys.readouterr().out
    assert serve.server_config(catalog, "latency", str(profiles), KEY, model_store, str(home)) == config
    assert "latency picks" in capsys.readouterr().out
    assert parse_config_properties(open(config).read())["models"].count('"batchSize": 1') == 2
    # An archive changed since tuning: that model keeps the catalog's setting; the others are tuned.
    profile = tp.load_profile(path)
    profile["models"]["diabetes"]["throughput"]["sha256"] = "f" * 64
    tp.write_profile(profile, str(profiles))
    config = serve.server_config(catalog, "auto", str(profiles), KEY, model_store, str(home))
    assert "diabetes: diabetes.mar changed since it was tuned" in capsys.readouterr().out
    load = parse_config_properties(open(config).read())["load_models"].split(",")
    assert "diabetes.mar" in load and "digits=digits_int8-tuned.mar" in load
    # An unreadable profile: PROFILE=auto serves the catalog's settings, saying why; explicit fails.
    open(path, "w").write("{not json")
    assert serve.server_config(catalog, "auto", str(profiles), KEY, model_store, str(home)) == CONFIG_PROPERTIES_PATH
    assert "WARNING cannot read the tuned profile" in capsys.readouterr().out
    with pytest.raises(tp.ProfileError):
        serve.server_config(catalog, "throughput", str(profiles), KEY, model_store, str(home))


# -- real runs -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_quick_tune_writes_a_profile_that_torchserve_then_serves(catalog, model_store, tmp_path, monkeypatch):
    """A real quick tune of diabetes (tiny windows) writes the profile into a temporary folder;
    a real TorchServe started from the configuration rendered from it serves the tuned copy under
    the name diabetes with the tuned batch size, workers and threads (describe shows them)."""
    try:
        loadgen.find_wrk()
    except loadgen.LoadgenMissing as exc:
        pytest.skip(f"no load generator here: {exc}")
    from scripts.serving.ts_server import TorchServe, local_addresses
    monkeypatch.setattr(tune, "QUICK", replace(tune.QUICK, batch_sizes=(4,), latency_archives=1))
    out = tmp_path / "tuned"
    code = tune.main(["--quick", "--models", "diabetes", "--seconds", "1", "--warmup", "0.3", "--out", str(out)])
    assert code == 0
    key = tp.profile_key(tp.machine_facts())
    profile = tp.load_profile(str(out / f"{key}.json"))
    assert (out / f"{key}.md").is_file() and list(profile["models"]) == ["diabetes"]
    tuned = profile["models"]["diabetes"]
    rows = tuned["table"]
    assert {r["archive"] for r in rows} <= {"diabetes.mar", "diabetes_int8.mar"}
    assert all(not r["failure"] for r in rows), [r["failure"] for r in rows if r["failure"]]
    assert tuned["throughput"] in [{**r, "sha256": tuned["throughput"]["sha256"], "note": tuned["throughput"]["note"]}
                                   for r in rows]
    assert tuned["latency"]["concurrency"] == 1

    # Serve it, with a batch size that no catalog setting has, to see it applied; and digits
    # tuned too (a made-up pick), whose version 2.0 stays the catalog's and 1.0 the default.
    tuned["throughput"].update(batch_size=3, max_batch_delay_ms=2, workers=2, threads=1)
    profile["models"].update(_profile(model_store, [("digits", "digits_int8.mar", tp.Setting(5, 3, 1, 1))])["models"])
    picked, problems = tp.choices(profile, "throughput", catalog, model_store)
    assert problems == [] and set(picked) == {"diabetes", "digits"}
    home = tmp_path / "serve"
    tp.prepare_store(picked, str(home / "store"), {"profile": "test", "key": key, "mode": "throughput"})
    two = Catalog(catalog.server, [m for m in catalog.models if m.name in ("diabetes", "digits")])
    overrides = {**local_addresses(), "metrics_config": os.path.join(tp.ROOT, "metrics.yaml")}
    config = home / "config.properties"
    config.write_text(tp.render_tuned_config(two, picked, str(home / "store"), overrides=overrides))
    server = TorchServe(str(home), str(config))
    server.start()
    try:
        server.client.wait_ready(["diabetes/1.0", "digits/1.0", "digits/2.0"], 180)
        from scripts.serving.manage import default_version, enforce_default_versions
        enforce_default_versions(server.client, two.default_versions())
        assert default_version(server.client, "digits") == "1.0"
        (v1,) = server.client.describe("digits", "1.0")
        (v2,) = server.client.describe("digits", "2.0")
        assert (v1["modelUrl"], v1["batchSize"], v1["maxBatchDelay"]) == ("digits_int8-tuned.mar", 5, 3)
        assert (v2["modelUrl"], v2["batchSize"], v2["maxBatchDelay"]) == ("digits_v2.0.mar", 8, 5)
        (described,) = server.client.describe("diabetes")
        assert described["modelUrl"] == f"{picked['diabetes'].entry.mar_name[:-4]}-tuned.mar"
        assert (described["batchSize"], described["maxBatchDelay"]) == (3, 2)
        assert (described["minWorkers"], described["maxWorkers"], len(described["workers"])) == (2, 2, 2)
        (custom,) = server.client.describe("diabetes", customized=True)
        meta = custom["customizedMetadata"]["meta"]
        assert meta["tuned"]["threads"] == 1 and meta["tuned"]["source"] == picked["diabetes"].entry.mar_name
        body = next(iter(measure.load_diabetes_rows().values()))
        answer = server.client.predict_raw("diabetes", body, content_type="application/json")
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    finally:
        server.stop()


def test_the_command_line_names_the_tunable_models():
    args = tune.parse_args(["--quick", "--models", "digits,diabetes", "--seconds", "1"], ["digits", "diabetes"])
    assert args.models == ["digits", "diabetes"] and args.grid.seconds == 1 and args.grid.keep == tune.QUICK.keep
    assert tune.parse_args([], ["digits"]).grid == tune.FULL
    with pytest.raises(SystemExit):
        tune.parse_args(["--models", "digits_int8"], ["digits", "diabetes"])
    assert tune.tunable(load_catalog()) == ["efficientnet_lite0", "digits", "minilm", "diabetes"]
