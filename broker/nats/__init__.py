"""NATS 2.9 (JetStream + MQTT gateway) configuration files (data only; shipped in the wheel).

``fstq.conf`` one cluster node: JetStream, R3 MQTT streams, loopback, no authentication.
``prod.conf`` the same limits with TLS, accounts and the per-device permissions.
The per-node values are NATS variables at the top of each file; :mod:`broker.local_nats`
rewrites only those lines for the tests' private clusters.
"""

from pathlib import Path

__all__ = ["CONFIG_DIR", "DEV_CONF", "PROD_CONF"]

CONFIG_DIR = Path(__file__).resolve().parent
DEV_CONF = CONFIG_DIR / "fstq.conf"
PROD_CONF = CONFIG_DIR / "prod.conf"
