#!/usr/bin/env bash
# The benchmark's load generator (scripts/bench/loadgen.py: `make bench`, tests/integration/test_bench.py) is wrk, C with
# LuaJIT scripting (Debian 12's package, 4.1). Use the one on PATH (or $WRK); where there is none and we
# may, install Debian's wrk; otherwise say exactly what to do.
set -euo pipefail
found() {
    local bin="${WRK:-}"
    [ -n "$bin" ] || bin=$(command -v wrk 2>/dev/null || true)
    [ -n "$bin" ] && [ -x "$bin" ] || return 1
    # "wrk debian/4.1.0-3+b2 [epoll] ..." or "wrk 4.2.0 [epoll] ...": 4.x has the Lua API scripts/bench/loadgen.lua
    # uses. (wrk --version exits 1 after printing it.)
    local said
    said=$("$bin" --version 2>&1 || true)
    printf '%s\n' "$said" | head -n1 | grep -Eq '^wrk ([a-z]+/)?[4-9]\.'
}
if found; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "wrk not found: installing wrk with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
    found && exit 0
    echo "apt-get installed wrk, but no usable wrk 4.x is on PATH." >&2
    exit 1
fi
echo "The benchmark's load generator, wrk 4.x, was not found." >&2
echo "Install it (Debian 12/Ubuntu 24.04: sudo apt-get install wrk) or put one on PATH (or set WRK)." >&2
exit 1
