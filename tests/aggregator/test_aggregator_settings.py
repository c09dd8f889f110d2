"""Each aggregator default is written once: the settings take the domain objects' defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aggregator.rounds import RoundPolicy
from aggregator.settings import AggregatorSettings, InboxSettings, LoraSettings, RoundSettings
from broker.inbox import InboxLimits
from workload.models import LoraSpec


def test_round_settings_default_to_the_round_policy() -> None:
    assert RoundSettings().policy() == RoundPolicy()
    # Every policy knob is a setting of the same name (policy() passes each one on).
    names = {f.name for f in dataclasses.fields(RoundPolicy)}
    assert names <= set(RoundSettings.model_fields)


def test_inbox_settings_default_to_the_inbox_limits() -> None:
    assert InboxSettings().limits() == InboxLimits()


def test_lora_settings_default_to_the_lora_spec() -> None:
    # LoraSpec lives beside torch, which the settings must not load: checked here instead.
    assert LoraSettings().spec() == LoraSpec()
    assert [f.name for f in dataclasses.fields(LoraSpec)] == list(LoraSettings.model_fields)


def test_a_changed_setting_reaches_the_domain_object(tmp_path: Path) -> None:
    s = AggregatorSettings(
        state_dir=tmp_path,
        rounds={"quorum": 2, "clients_per_round": 4},
        inbox={"max_chunk_size": 4096, "upload_ttl_s": 5.0},
        lora={"r": 4},
    )
    assert (s.rounds.policy().quorum, s.rounds.policy().clients_per_round) == (2, 4)
    assert s.inbox.limits().transfer.max_chunk_size == 4096 and s.inbox.limits().upload_ttl_s == 5
    assert s.lora.spec() == LoraSpec(r=4)


def test_the_fleet_views_silent_threshold_is_the_heartbeat_ttl_default() -> None:
    # The observer's view (fedfstq status, the demo) does not load the aggregator for one
    # number, so it repeats it and this holds the two equal.
    from fedfstq.fleet_view import SILENT_AFTER_S

    assert RoundSettings().heartbeat_ttl_s == SILENT_AFTER_S
