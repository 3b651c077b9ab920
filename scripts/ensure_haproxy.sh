#!/usr/bin/env bash
# The gateway (scripts/deploy/gateway.py, make rehearse, tests/integration/test_gateway.py) runs HAProxy 2.6 or newer
# (Debian 12's package). Use the one on PATH (or /usr/sbin/haproxy); where there is none and we may,
# install Debian's haproxy; otherwise say exactly what to do.
set -euo pipefail
found() {
    local bin
    bin=$(command -v haproxy 2>/dev/null || true)
    [ -z "$bin" ] && [ -x /usr/sbin/haproxy ] && bin=/usr/sbin/haproxy
    [ -n "$bin" ] || return 1
    # "HAProxy version 2.6.12-1+deb12u4 ..." -> 2.6: at least 2.6 (http-request return, sha2, retry-on)
    "$bin" -v 2>/dev/null | head -n1 | awk '{split($3, v, "."); exit !(v[1] > 2 || (v[1] == 2 && v[2] >= 6))}'
}
if found; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "HAProxy 2.6+ not found: installing haproxy with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy
    # Debian's package enables a system service; the rehearsal runs its own haproxy processes.
    exit 0
fi
echo "The gateway needs HAProxy 2.6 or newer and none was found." >&2
echo "Install it (Debian 12/Ubuntu 24.04: sudo apt-get install haproxy) or put one on PATH (or set HAPROXY)." >&2
exit 1
