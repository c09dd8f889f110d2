"""The settings files the demo writes for its services are valid TOML the services accept."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge_agent.settings import AgentSettings
from fedfstq import cli
from fedfstq.demo import _write_configs, write_toml


def test_write_toml_leaves_unset_values_out(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"

    write_toml(path, {"name": 'a "quoted" path\\', "n": 3, "t": {"x": None, "y": [1.5, 2.0]}})

    assert tomllib.loads(path.read_text()) == {
        "name": 'a "quoted" path\\', "n": 3, "t": {"y": [1.5, 2.0]}
    }  # fmt: skip


@pytest.mark.parametrize(
    "extra", [[], ["--budget-bytes", "4096", "--method", "topk"], ["--mqtt-protocol", "3.1.1"]]
)
def test_the_demo_configs_validate_as_the_services_settings(
    tmp_path: Path, extra: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FEDFSTQ_AGENT_MQTT__HOST", "FEDFSTQ_AGG_MQTT__HOST"):
        monkeypatch.delenv(name, raising=False)
    args = cli._build_parser().parse_args(["demo", "--clients", "2", "--model", "tiny", *extra])
    data = [tmp_path / "d0.jsonl", tmp_path / "d1.jsonl"]

    agg_cfg, agent_cfgs = _write_configs(args, tmp_path, "127.0.0.1", 1883, data, tmp_path / "e")

    agents = [AgentSettings(**tomllib.loads(cfg.read_text())) for cfg in agent_cfgs]
    assert [a.client_id for a in agents] == ["device-0", "device-1"]
    assert {a.compression.budget_bytes for a in agents} == ({4096} if "topk" in extra else {None})
    protocol = "3.1.1" if "3.1.1" in extra else "5"
    assert {a.mqtt.protocol for a in agents} == {protocol}
    from aggregator.settings import AggregatorSettings  # torch (LoraSpec): only this test

    agg = AggregatorSettings(**tomllib.loads(agg_cfg.read_text()))
    assert (agg.fleet, agg.mqtt.port, agg.rounds.max_rounds) == ("demo", 1883, 3)
    assert agg.mqtt.protocol == protocol
