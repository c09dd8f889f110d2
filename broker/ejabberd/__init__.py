"""ejabberd 23.01 (mod_mqtt) configuration files (data only; a package so they ship in the wheel).

``dev.yml``  loopback MQTT listener, login without an account (any non-empty password).
``prod.yml`` TLS listener, accounts, the per-device ACL of ``broker/mosquitto/fstq.acl``.
``ejabberdctl.cfg`` one node's ``ejabberdctl`` settings (node name, cookie, interface).
:mod:`broker.local_ejabberd` renders ``dev.yml`` or ``prod.yml`` into a private cluster.
"""

from pathlib import Path

__all__ = ["CONFIG_DIR", "CTL_CFG", "DEV_YML", "PROD_YML"]

CONFIG_DIR = Path(__file__).resolve().parent
DEV_YML = CONFIG_DIR / "dev.yml"
PROD_YML = CONFIG_DIR / "prod.yml"
CTL_CFG = CONFIG_DIR / "ejabberdctl.cfg"
