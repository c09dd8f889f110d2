"""Mosquitto configuration files (data only; a package so the files ship in the wheel).

``dev.conf``  loopback, anonymous, for a developer machine and the test fixtures.
``prod.conf`` TLS on 8883, passwords, ACL (``fstq.acl``), persistence.
:mod:`broker.local` renders either into a private broker on a free port.
"""

from pathlib import Path

__all__ = ["ACL_FILE", "CONFIG_DIR", "DEV_CONF", "PROD_CONF"]

CONFIG_DIR = Path(__file__).resolve().parent
DEV_CONF = CONFIG_DIR / "dev.conf"
PROD_CONF = CONFIG_DIR / "prod.conf"
ACL_FILE = CONFIG_DIR / "fstq.acl"
