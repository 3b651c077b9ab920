#!/usr/bin/env bash
# The one entrypoint of a TorchServe replica: the container (Dockerfile, deploy/k8s) and the local
# rehearsal (scripts/drills/rehearse.py, make rehearse) both run it.
#
#  1. writes the replica's config.properties (python -m scripts.serving.pod_config render): the catalog's
#     configuration, KServe-free, token authorization off, TS_* environment variables applied
#     (listeners, TS_MODEL_STORE, TS_LOAD_MODELS, ...; see scripts/serving/pod_config.py);
#  2. starts `torchserve --start --foreground --ncs` with it;
#  3. in the background, once the management API lists the served versions, sets the catalog's
#     default versions (TorchServe 0.12 ignores defaultVersion at start);
#  4. stays in the foreground as the process the container runtime signals (PID 1 in a container):
#     SIGTERM or SIGINT is passed to TorchServe's Java frontend as SIGTERM, and it exits with
#     TorchServe: 0 when stopped (a signal, or `torchserve --stop` as in the pods' preStop hook),
#     1 when TorchServe exited on its own (killed, crashed), so that the container is restarted. Not `exec torchserve`: `torchserve --foreground` is a Python wrapper that starts
#     Java as its child and waits; it forwards no signal, so a SIGTERM would kill the wrapper (or,
#     as PID 1 without a handler, be ignored) and leave Java running.
#
# Environment: TMPDIR (default /tmp: pid file, extracted archives), LOG_LOCATION and
# METRICS_LOCATION (default $TMPDIR/torchserve-pod/logs), TS_CONFIG_FILE (where the config is
# written; default $TMPDIR/torchserve-pod/config.properties), PYTHON (default python3),
# SERVE_START_TIMEOUT (seconds the default-version step waits for TorchServe, default 600).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."                                   # the repository root (the image's WORKDIR)

PYTHON=${PYTHON:-python3}
export TMPDIR=${TMPDIR:-/tmp}
export TEMP=${TEMP:-$TMPDIR}                    # torchserve passes it to Java as java.io.tmpdir
pod_home=$TMPDIR/torchserve-pod
export LOG_LOCATION=${LOG_LOCATION:-$pod_home/logs}
export METRICS_LOCATION=${METRICS_LOCATION:-$LOG_LOCATION}
config=${TS_CONFIG_FILE:-$pod_home/config.properties}
mkdir -p "$pod_home" "$LOG_LOCATION" "$METRICS_LOCATION" "$(dirname "$config")"

log() { echo "entrypoint: $*" >&2; }

store=$("$PYTHON" -m scripts.serving.pod_config render --out "$config")
log "config $config, model store $store"

torchserve --start --foreground --ncs --ts-config "$config" --model-store "$store" &
wrapper=$!
"$PYTHON" -m scripts.serving.pod_config enforce-defaults "$config" &
enforcer=$!

stopping=""
forward() {
    stopping=$1
    local java
    java=$(cat "$TMPDIR/.model_server.pid" 2>/dev/null || true)
    if [[ -n $java ]] && kill -0 "$java" 2>/dev/null; then
        log "SIG$1: stopping TorchServe (frontend pid $java)"
        kill -TERM "$java" 2>/dev/null || true
    else                                        # Java not started yet: stop the wrapper itself
        kill -TERM "$wrapper" 2>/dev/null || true
    fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
while true; do
    wait "$wrapper" && status=0 || status=$?
    kill -0 "$wrapper" 2>/dev/null || break     # else `wait` was interrupted by a trapped signal
done
kill -TERM "$enforcer" 2>/dev/null || true
wait "$enforcer" 2>/dev/null || true

if [[ -n $stopping ]]; then
    log "TorchServe stopped (SIG$stopping)"
    exit 0
fi
# `torchserve --stop` (the pods' preStop hook) removes the pid file once Java has exited.
for _ in $(seq 20); do
    [[ -e $TMPDIR/.model_server.pid ]] || break
    sleep 0.1
done
if [[ $status == 0 && ! -e $TMPDIR/.model_server.pid ]]; then
    log "TorchServe stopped (torchserve --stop)"
    exit 0
fi
# The wrapper exits 0 whatever became of Java: any exit we did not ask for is a failure, so that
# the container is restarted.
log "TorchServe exited unexpectedly (wrapper status $status); see $LOG_LOCATION"
exit 1
