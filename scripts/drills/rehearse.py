"""Local rehearsal of the cluster, with its real parts, on loopback only: two TorchServe replicas
started by scripts/entrypoint.sh (each on its own free ports, with its own TMPDIR and logs, serving
the light models only: digits 1.0 and 2.0, diabetes), the gateway (HAProxy with scripts/deploy/gateway.py's
configuration) in front of them, and drills under steady, bounded traffic:

  kill      kill -9 one replica (its process group: Java frontend and Python workers): only requests
            in flight may fail; how long until the gateway marks it DOWN
  restart   run its entrypoint again: kept out of the gateway until it is ready (as a readiness probe
            keeps a pod out of its Service), then let in; how long until it serves again
  rollout   digits 2.0 as the default, replica by replica (drain in the gateway, set-default, ready):
            no request fails, and every answer comes from the version its replica served then
  auth      a missing or wrong key: 401 from the gateway, and no replica sees the request
  limits    a form-urlencoded upload: 415; a body over max_request_size: 413

    python -m scripts.drills.rehearse [--threads 3] [--json report.json]      (make rehearse)

Exit status 1 when a drill fails. The parts are in scripts/drills/rehearsal.py, the drills in
scripts/drills/rehearsal_drills.py.
"""
import argparse
import json
import os
import shutil
import sys
import time
from typing import List, Sequence, Tuple

from models.catalog import ROOT
from scripts.drills.rehearsal import DrillResult, Rehearsal, RehearsalError, haproxy_binary
from scripts.drills.rehearsal_drills import DRILLS


def run(home: str, threads: int = 3, drills: Sequence[str] = tuple(DRILLS)) -> Tuple[List[DrillResult], dict]:
    results = []
    started = time.monotonic()
    with Rehearsal(home, threads=threads) as reh:
        startup = dict(reh.startup)
        print(f"2 replicas ready and the gateway up in {startup['all']['ready']:.1f} s "
              f"(gateway {reh.gateway.url}, logs in {os.path.relpath(reh.home, ROOT)})", flush=True)
        for name in drills:
            t0 = time.monotonic()
            try:
                result = DRILLS[name](reh)
            except RehearsalError as exc:
                result = DrillResult(name, False, problems=[str(exc)])
            result.figures["took"] = time.monotonic() - t0
            print(result.line(), flush=True)
            results.append(result)
    return results, {"startup": startup, "total_s": time.monotonic() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.drills.rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=os.path.join(ROOT, "build", "rehearsal"),
                        help="replicas' and gateway's files and logs (emptied first)")
    parser.add_argument("--threads", type=int, default=3, help="client threads of the steady traffic")
    parser.add_argument("--drill", action="append", choices=list(DRILLS),
                        help="run only these drills (repeat; default: all, in order)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    try:
        haproxy_binary()
    except RehearsalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shutil.rmtree(args.home, ignore_errors=True)
    try:
        results, meta = run(args.home, args.threads, args.drill or list(DRILLS))
    except RehearsalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(r.requests for r in results)
    bad = sum(r.failed for r in results)
    print(f"\n{len(results)} drills, {sum(r.ok for r in results)} passed; {total} requests sent, {bad} failed; "
          f"{meta['total_s']:.0f} s in all")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"drills": [r.__dict__ for r in results], **meta}, f, indent=2, default=str)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
