"""common: what both services (and the ``fedfstq`` CLI) share that is not MQTT.

Settings assembly (:mod:`common.settings`), the exit-code table (:mod:`common.exit_codes`), stop
signals (:mod:`common.signals`), log context (:mod:`common.log_context`) and atomic, durable
writes (:mod:`common.atomic`). Standard library and pydantic only; it imports no project package
(``tests/test_import_rules.py``). Nothing is imported here: each user loads only its module.
"""
