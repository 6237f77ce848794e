#!/usr/bin/env bash
# Installs what tests/recipes/test_observability.py drives: Debian's prometheus and chromium (make setup calls this).
# Idempotent and quiet: nothing to do when both are on PATH. Without root or apt-get it says so and leaves the
# test to skip. Debian's prometheus package would start a service listening on every address where systemd runs:
# it is stopped and disabled here; the test starts its own Prometheus on 127.0.0.1.
set -u
if command -v prometheus >/dev/null && command -v chromium >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "observe-tools: prometheus/chromium missing and not installable here (needs root and apt-get);" \
         "tests/recipes/test_observability.py will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null; }; then
    echo "observe-tools: apt-get could not install prometheus chromium; the observability test will be skipped" >&2
    exit 0
fi
if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
