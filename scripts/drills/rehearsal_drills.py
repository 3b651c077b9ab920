"""The drills of the rehearsal (scripts/drills/rehearse.py): each a function of a running ``Rehearsal``
returning a ``DrillResult``; the tests call them one by one."""
import http.client
import json
import os
import threading
import time
import uuid
from typing import Dict, Sequence, Tuple

import psutil
import requests

from scripts.deploy import gateway
from scripts.serving import manage
from scripts.drills.rehearsal import DrillResult, Rehearsal, failed


# -- the drills ---------------------------------------------------------------------------------

def _wait_dead(members: Sequence[psutil.Process], timeout_s: float = 10.0) -> float:
    """Seconds until every process is gone (or a zombie), polled every 5 ms."""
    started = time.monotonic()
    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    while any(alive(p) for p in members) and time.monotonic() - started < timeout_s:
        time.sleep(0.005)
    return time.monotonic() - started


def drill_kill(reh: Rehearsal, victim: str = "s1", before_s: float = 2.0, after_s: float = 3.0) -> DrillResult:
    """kill -9 of one replica's process group under steady traffic. Only requests in flight while
    it died (sent before its last process was gone) may fail; the gateway must mark it DOWN
    (detection time: from the SIGKILL) and send everything else to the other replica."""
    replica = reh.replicas[victim]
    with reh.load() as load:
        load.wait_answers(20, server=victim)
        time.sleep(before_s)
        killed_at = time.monotonic()
        members = replica.kill9()
        dead: Dict[str, float] = {}
        watcher = threading.Thread(target=lambda: dead.setdefault("s", _wait_dead(members)), daemon=True)
        watcher.start()
        transitions: Dict[str, float] = {}
        polled = time.monotonic()
        reh.gateway.wait_status(victim, "DOWN", timeout_s=30, poll_s=0.01, seen=transitions)
        detection_s = time.monotonic() - killed_at
        transitions = {k: round(v + polled - killed_at, 3) for k, v in transitions.items()}
        watcher.join(timeout=15)
        survivors = replica.reap(members)
        time.sleep(after_s)
    dead_at = killed_at + dead.get("s", 0.0)
    records = load.snapshot()
    bad = failed(records)
    problems = [f"sent {r.sent - dead_at:+.3f} s after the replica was gone, failed: {r.status} {r.error}"
                for r in bad if r.sent > dead_at]
    in_flight = sum(1 for r in records if r.sent <= dead_at and r.done >= killed_at)
    late = [r for r in records if r.server == victim and r.sent > dead_at]
    problems += [f"{len(late)} requests sent after the kill were answered by {victim}"] if late else []
    if len(members) < 3:
        problems.append(f"the killed process group held only {len(members)} processes")
    if survivors:
        problems.append(f"still alive after SIGKILL: {[p.pid for p in survivors]}")
    return DrillResult("kill", not problems, len(records), len(bad), {
        "processes_killed": len(members), "gone_after": dead.get("s", float("nan")),
        "in_flight": in_flight, "failed_in_flight": sum(1 for r in bad if r.sent <= dead_at),
        "gateway_states": transitions, "detection": detection_s}, problems)


def drill_restart(reh: Rehearsal, victim: str = "s1", timeout_s: float = 240.0) -> DrillResult:
    """Run the replica's entrypoint again under traffic. The gateway keeps it in maintenance until
    it is ready (every served version's workers READY, default versions set: what a readiness
    probe checks), then lets it in; rejoin = from the start until it answers through the gateway."""
    replica = reh.replicas[victim]
    if replica.process is not None and replica.process.poll() is None:   # not killed before: kill it
        replica.reap(replica.kill9())
        reh.gateway.wait_status(victim, "DOWN", timeout_s=30)
    with reh.load() as load:
        reh.gateway.set_state(victim, "maint")       # out of rotation until ready, like an unready pod
        started = time.monotonic()
        replica.start()
        times = replica.wait_ready(timeout_s)
        reh.gateway.set_state(victim, "ready")
        up_s = reh.gateway.wait_status(victim, "UP", timeout_s=30) + (times["ready"])
        load.wait_answers(10, server=victim, timeout_s=60)
        rejoin_s = min(r.done for r in load.snapshot() if r.server == victim and r.sent >= started) - started
        time.sleep(1.0)
    records = [r for r in load.snapshot()]
    bad = failed(records)
    problems = [f"failed: {r.status} {r.error}" for r in bad][:10]
    return DrillResult("restart", not bad, len(records), len(bad), {
        "ping_answers": times["ping"], "ready": times["ready"], "gateway_up": up_s,
        "rejoin": rejoin_s}, problems)


def drill_rollout(reh: Rehearsal, model: str = "digits", version: str = "2.0",
                  settle_s: float = 1.0) -> DrillResult:
    """``version`` of ``model`` as the default, one replica at a time, under traffic: drain it in the
    gateway (no new requests), wait for its requests in flight, set-default, put it back. No request
    may fail; an answer a replica finished before its switch carries the old version, one sent to it
    after the switch the new version, and none may be in flight on it during the switch."""
    switch: Dict[str, Tuple[float, float]] = {}   # replica -> set-default (started, returned)
    before: Dict[str, str] = {}
    drains: Dict[str, float] = {}
    with reh.load() as load:
        load.wait_answers(20)
        for name, replica in reh.replicas.items():
            before[name] = manage.default_version(replica.client, model)
            reh.gateway.set_state(name, "drain")
            drain_started = time.monotonic()
            deadline = drain_started + 30
            while int(reh.gateway.servers()[name]["scur"] or 0) > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            drains[name] = time.monotonic() - drain_started
            history = os.path.join(replica.home, manage.HISTORY_FILE)
            started = time.monotonic()
            manage.set_default(replica.client, model, version, history)
            switch[name] = (started, time.monotonic())
            reh.gateway.set_state(name, "ready")
            load.wait_answers(20, server=name)
            time.sleep(settle_s)
    records = load.snapshot()
    bad = failed(records)
    problems = [f"failed: {r.status} {r.error}" for r in bad][:10]
    wrong = []
    for r in records:
        if r.model != model or r.status != 200 or r.server not in switch:
            continue
        started, returned = switch[r.server]
        if r.done <= started:
            expected = before[r.server]
        elif r.sent >= returned:
            expected = version
        else:
            wrong.append(f"{r.server} had a request in flight during its switch "
                         f"(sent {r.sent - started:+.3f} s, answered {r.done - started:+.3f} s)")
            continue
        if r.version != expected:
            wrong.append(f"{r.server} answered with {r.version}, expected {expected}")
    problems += wrong[:10]
    served: Dict[str, int] = {}
    for r in records:
        if r.model == model and r.status == 200:
            served[f"{r.server}:{r.version}"] = served.get(f"{r.server}:{r.version}", 0) + 1
    return DrillResult("rollout", not bad and not wrong, len(records), len(bad),
                       {"answers": dict(sorted(served.items())), "wrong_version": len(wrong),
                        "longest_drain": max(drains.values())}, problems)


def _seen_by_replicas(reh: Rehearsal, marker: str) -> int:
    return sum(r.access_log().count(marker) for r in reh.replicas.values())


def drill_auth(reh: Rehearsal) -> DrillResult:
    """No key, a wrong key, the key under another scheme: 401 with a JSON body, and no replica sees
    the request (its path is looked for in every replica's access log). The right key gets through
    (the same path reaches a replica's access log: the check can see a request that passes)."""
    marker = f"drill{uuid.uuid4().hex[:12]}"
    path = f"/predictions/{marker}"
    cases = {"no key": {}, "wrong X-API-Key": {"X-API-Key": gateway.new_key()},
             "wrong Bearer": {"Authorization": f"Bearer {gateway.new_key()}"},
             "key as Basic": {"Authorization": f"Basic {reh.key}"},
             "key without scheme": {"Authorization": reh.key}}
    problems, statuses = [], {}
    for case, headers in cases.items():
        r = requests.post(reh.gateway.url + path, data=reh.digits[0],
                          headers={**headers, "Content-Type": "image/png"}, timeout=10)
        statuses[case] = r.status_code
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 401 or not isinstance(body, dict) or body.get("code") != 401:
            problems.append(f"{case}: {r.status_code} {r.text[:120]}")
    for case, headers in {"X-API-Key": {"X-API-Key": reh.key},
                          "Bearer": {"Authorization": f"Bearer {reh.key}"}}.items():
        r = requests.post(reh.gateway.url + "/predictions/digits", data=reh.digits[0],
                          headers={**headers, "Content-Type": "image/png"}, timeout=10)
        statuses[f"right key ({case})"] = r.status_code
        if r.status_code != 200:
            problems.append(f"right key as {case}: {r.status_code} {r.text[:120]}")
    time.sleep(1.0)   # access logs are written when the answer is sent
    seen = _seen_by_replicas(reh, marker)
    if seen:
        problems.append(f"replicas logged {seen} of the refused requests")
    control = requests.post(reh.gateway.url + path, data=reh.digits[0],
                            headers={"X-API-Key": reh.key, "Content-Type": "image/png"}, timeout=10)
    deadline = time.monotonic() + 5
    while _seen_by_replicas(reh, marker) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if _seen_by_replicas(reh, marker) != 1:
        problems.append(f"control request with the key (answered {control.status_code}) not found in "
                        "the replicas' access logs: the check cannot see requests")
    return DrillResult("auth", not problems, len(cases) + 3, 0,  # + the key twice + the control
                       {"statuses": statuses, "refused_seen_by_replicas": seen}, problems)


def _raw_request(url: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Tuple[int, bytes]:
    """Headers (and ``body``) on a plain connection; the answer is read even if the gateway answers
    before the body it was promised (as it does for a Content-Length over the limit)."""
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def drill_limits(reh: Rehearsal) -> DrillResult:
    """A form-urlencoded upload (curl --data-binary @photo without a type): 415 naming the fix,
    where a replica asked directly answers 500. A Content-Length over max_request_size: 413 before
    any of the body is read."""
    problems, figures = [], {}
    png = reh.digits[0]
    form = {"X-API-Key": reh.key, "Content-Type": "application/x-www-form-urlencoded"}
    r = requests.post(reh.gateway.url + "/predictions/digits", data=png, headers=form, timeout=10)
    figures["form_upload"] = r.status_code
    if r.status_code != 415 or "curl -T" not in r.text or r.json().get("code") != 415:
        problems.append(f"form upload: {r.status_code} {r.text[:150]}")
    # What TorchServe itself makes of such an upload (asked directly, bypassing the gateway).
    from models import sample_data
    replica_url = next(iter(reh.replicas.values())).inference_url + "/predictions/digits"
    for name, data in (("png", png), ("jpeg", sample_data.photo_bytes()[0])):
        direct = requests.post(replica_url, data=data, timeout=30,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        figures[f"form_{name}_direct_to_torchserve"] = f"{direct.status_code} {direct.text[:80]!r}"
    limit = gateway.max_request_size(reh.catalog)
    status, body = _raw_request(reh.gateway.url, "/predictions/digits",
                                {"X-API-Key": reh.key, "Content-Type": "image/png",
                                 "Content-Length": str(limit + 1)})
    figures["oversized"] = status
    if status != 413 or json.loads(body or b"{}").get("code") != 413:
        problems.append(f"oversized body: {status} {body[:150]!r}")
    status, _ = _raw_request(reh.gateway.url, "/predictions/digits",
                             {"X-API-Key": reh.key, "Content-Type": "image/png",
                              "Content-Length": str(len(png))}, png)
    figures["within_limit"] = status
    if status != 200:
        problems.append(f"a PNG within the limit: {status}")
    return DrillResult("limits", not problems, 5, 0, figures, problems)


DRILLS = {"kill": drill_kill, "restart": drill_restart, "rollout": drill_rollout,
          "auth": drill_auth, "limits": drill_limits}

