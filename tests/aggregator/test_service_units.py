"""Pure parts of the aggregator service: settings, CLI, health check, metrics, global adapter."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aggregator.cli import add_arguments, check_health, load_settings, main, serve
from aggregator.global_adapter import GlobalAdapter, InitialAdapter, LoraMismatchError
from aggregator.metrics import RoundMetrics, append_jsonl, received_wire_bytes
from aggregator.round_result import ClientUpload, HeldOutEval, read_rounds
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.local import LocalBroker, free_port
from broker.transport import Message
from common.exit_codes import ExitCode
from common.record import RecordError
from common.settings import ConfigError
from workload.adapters import adapter_from_bytes
from workload.models import LoraSpec

Args = Callable[..., argparse.Namespace]


@pytest.fixture
def args() -> Args:
    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(list(argv))

    return parse


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- settings ------------------------------------------------------------------------------------


def test_environment_beats_the_file_and_flags_beat_the_file(
    tmp_path: Path, args: Args, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(
        tmp_path / "agg.toml",
        f'fleet = "f1"\nstate_dir = "{tmp_path}/from-file"\n'
        '[mqtt]\nhost = "file-host"\nport = 1000\n[rounds]\nquorum = 2\nclients_per_round = 4\n',
    )
    monkeypatch.setenv("FEDFSTQ_AGG_ROUNDS__QUORUM", "3")
    monkeypatch.setenv("FEDFSTQ_AGG_MQTT__PORT", "2000")
    from_file = load_settings(args("--config", str(config)))
    assert from_file.rounds.quorum == 3 and from_file.rounds.clients_per_round == 4
    assert from_file.mqtt.port == 2000 and from_file.mqtt.host == "file-host"
    assert from_file.mqtt.client_id == "aggregator-f1"
    assert from_file.rounds_path == tmp_path / "from-file" / "rounds.jsonl"
    monkeypatch.delenv("FEDFSTQ_AGG_MQTT__PORT")
    flagged = load_settings(
        args("--config", str(config), "--broker-port", "3000", "--state-dir", str(tmp_path))
    )
    assert flagged.mqtt.port == 3000 and flagged.state_dir == tmp_path
    assert flagged.mqtt.host == "file-host" and flagged.rounds.quorum == 3
    # A flag next to the variable of the same setting: refused, not silently one of them.
    monkeypatch.setenv("FEDFSTQ_AGG_STATE_DIR", str(tmp_path / "from-env"))
    with pytest.raises(ConfigError, match="--state-dir and FEDFSTQ_AGG_STATE_DIR are both set"):
        load_settings(args("--config", str(config), "--state-dir", str(tmp_path)))


def test_password_comes_from_a_file_and_survives_flag_overrides(tmp_path: Path, args: Args) -> None:
    secret = _write(tmp_path / "pw", "s3cret\n")
    config = _write(
        tmp_path / "agg.toml", f'state_dir = "{tmp_path}"\nmqtt_password_file = "{secret}"\n'
        '[mqtt]\nusername = "aggregator"\n',
    )  # fmt: skip
    s = load_settings(args("--config", str(config), "--broker-host", "elsewhere"))
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "s3cret"
    assert s.mqtt.host == "elsewhere"


@pytest.mark.parametrize(
    "text",
    [
        "state_dir = [",  # not TOML
        'state_dir = "/x"\nunknown_key = 1\n',
        'state_dir = "/x"\n[rounds]\nquorum = 5\nclients_per_round = 2\n',  # RoundPolicy rule
    ],
)
def test_bad_configuration_exits_2(tmp_path: Path, args: Args, text: str) -> None:
    assert main(args("--config", str(_write(tmp_path / "c.toml", text)))) == ExitCode.CONFIG


# -- exit codes at start ---------------------------------------------------------------------------


def test_unloadable_model_exits_4(tmp_path: Path) -> None:
    s = AggregatorSettings(state_dir=tmp_path, model=str(tmp_path / "no-model"))
    assert serve(s) == ExitCode.MODEL == 4


def test_unreadable_evaluation_data_exits_3(tmp_path: Path) -> None:
    s = AggregatorSettings(state_dir=tmp_path, model="tiny", eval={"path": tmp_path / "gone.jsonl"})
    assert serve(s) == ExitCode.DATA == 3


def _with_global_v0(state_dir: Path, mqtt: dict[str, object]) -> AggregatorSettings:
    """Settings over a state directory that already holds global v0, so start-up gets as far
    as the broker without a model."""
    s = AggregatorSettings(
        state_dir=state_dir,
        model="tiny",
        lora={"r": 2, "target_modules": ["q_proj"]},
        mqtt=mqtt,
        start_timeout_s=0.5,
    )
    GlobalAdapter.build(0, 0, _state(), spec=s.lora.spec(), base_model="tiny", chunk_size=64).save(
        s.global_dir(0), s.lora.spec(), "tiny"
    )
    store = AggregatorStore(s.db_path)
    from aggregator.store import GlobalRecord

    store.add_global(GlobalRecord(0, None, "", str(s.global_dir(0)), 0.0))
    store.close()
    return s


@pytest.mark.broker
def test_refused_credentials_exit_2(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), "aggregator", "right"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    acl = Path(__file__).resolve().parents[2] / "broker" / "mosquitto" / "fstq.acl"
    with LocalBroker("prod", workdir=tmp_path / "broker", password_file=passwd, acl_file=acl) as b:
        s = _with_global_v0(
            tmp_path / "state",
            {"port": b.port, "username": "aggregator", "password": "wrong", "client_id": "agg"},
        )
        assert serve(s) == ExitCode.CONFIG  # a restart cannot fix a bad password


@pytest.mark.broker
def test_unreachable_broker_exits_5(tmp_path: Path, mosquitto: LocalBroker) -> None:
    s = _with_global_v0(tmp_path, {"port": free_port()})
    assert serve(s) == ExitCode.BROKER_UNREACHABLE == 5
    # The same state with other LoRA settings is a configuration error, found before the broker.
    other_lora = s.model_copy(update={"lora": s.lora.model_copy(update={"r": 8})})
    assert serve(other_lora) == ExitCode.CONFIG


# -- health check ----------------------------------------------------------------------------------


def test_check_needs_the_store_and_a_fresh_heartbeat(tmp_path: Path, args: Args) -> None:
    s = AggregatorSettings(state_dir=tmp_path, health_interval_s=1.0)
    healthy, message = check_health(s)
    assert not healthy and "no store" in message
    AggregatorStore(s.db_path).close()
    assert not check_health(s)[0]  # no heartbeat yet
    s.health_path.write_text(f"{time.time() - 10:.3f}\n")
    healthy, message = check_health(s)
    assert not healthy and "old" in message
    s.health_path.write_text(f"{time.time():.3f}\n")
    healthy, message = check_health(s)
    assert healthy and message.startswith("healthy")
    config = _write(tmp_path / "c.toml", f'state_dir = "{tmp_path}"\nhealth_interval_s = 1.0\n')
    assert main(args("--config", str(config), "--check")) == ExitCode.OK
    s.health_path.write_text("garbage")
    assert main(args("--config", str(config), "--check")) == ExitCode.UNEXPECTED


# -- metrics -------------------------------------------------------------------------------------


def test_wire_bytes_count_mqtt_framing() -> None:
    plain = Message("fstq/v1/f/up/c/1", b"x" * 200, 1, False)
    # fixed header 1 + remaining-length 2, topic 2 + 16, packet id 2, properties 1, payload 200
    assert received_wire_bytes(plain) == 1 + 2 + 18 + 2 + 1 + 200
    with_props = Message("fstq/v1/f/up/c/1", b"x" * 200, 1, False, (("k", "vv"),), expiry_s=9)
    assert received_wire_bytes(with_props) == received_wire_bytes(plain) + 5 + (1 + 2 + 1 + 2 + 2)


def _upload(sent: int, dense: int) -> ClientUpload:
    return ClientUpload(
        bytes=sent, dense_fp16_bytes=dense, ratio_vs_fp16=dense / sent, method="fstq",
        sample_count=5, norm=0.5, wire_bytes=sent + 50,
    )  # fmt: skip


def test_round_record_takes_over_idle_traffic_and_reports_ratios(tmp_path: Path) -> None:
    idle = RoundMetrics(0, 0, (), 0.0)
    idle.add_downlink(2, 100, 130)
    idle.late = 1
    idle.uplink_resent_bytes = 7
    rnd = RoundMetrics(3, 2, ("a", "b"), 10.0)
    rnd.absorb(idle)
    rnd.rejected["origin"] += 1
    rnd.clients["a"] = _upload(100, 400)
    rec = rnd.record(status="closed", global_version=3, closed_at=12.5, close_s=0.25)
    assert rec.downlink_chunks == 2 and rec.downlink_wire_bytes == 130 and rec.late == 1
    assert rec.rejected == {"origin": 1} and rec.arrived == ("a",)
    assert rec.clients["a"].ratio_vs_fp16 == 4.0 and rec.ratio_vs_fp16 == 4.0
    assert rec.duration_s == 2.5 and rec.close_s == 0.25 and rec.uplink_resent_bytes == 7
    append_jsonl(tmp_path / "r.jsonl", rec)
    assert read_rounds(tmp_path / "r.jsonl") == [rec]


def test_round_record_keeps_the_json_keys_of_existing_rounds_jsonl_files(tmp_path: Path) -> None:
    # Arrange: a closed round with an evaluation, and a failed one
    rnd = RoundMetrics(3, 2, ("b", "a"), 10.0)
    rnd.uplink_resent_bytes, rnd.duplicate_chunks = 7, 1
    rnd.clients["b"] = _upload(100, 400)
    evaluation = HeldOutEval(loss=3.5, accuracy=0.25, tokens=40)
    closed = rnd.record(status="closed", global_version=3, closed_at=12.5, evaluation=evaluation)
    failed = RoundMetrics(4, 3, ("a",), 20.0).record(
        status="failed", global_version=3, closed_at=30
    )
    path = tmp_path / "rounds.jsonl"

    # Act
    append_jsonl(path, closed)
    append_jsonl(path, failed)

    # Assert: the line is what the demo, the tests and older readers parse, key for key
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert list(first) == [
        "round", "status", "base_version", "global_version", "selected", "arrived", "late",
        "rejected", "uplink_messages", "uplink_wire_bytes", "uplink_payload_bytes",
        "duplicate_chunks", "duplicate_bytes", "downlink_chunks", "downlink_payload_bytes",
        "downlink_wire_bytes", "control_wire_bytes", "accepted_payload_bytes", "ratio_vs_fp16",
        "clients", "clipped", "eval", "extensions", "resumed", "opened_at", "closed_at",
        "duration_s", "close_s",
    ]  # fmt: skip
    assert first["duplicate_bytes"] == 7 and first["selected"] == ["b", "a"]
    assert first["eval"] == {"loss": 3.5, "accuracy": 0.25, "tokens": 40}
    assert list(first["clients"]["b"]) == [
        "bytes", "dense_fp16_bytes", "ratio_vs_fp16", "method", "sample_count", "norm",
        "wire_bytes",
    ]  # fmt: skip
    assert list(second) == list(first)
    assert second["eval"] is None and second["ratio_vs_fp16"] is None


def test_a_rounds_jsonl_line_that_is_not_a_round_record_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    rec = RoundMetrics(1, 0, ("a",), 0.0).record(status="failed", global_version=0, closed_at=1)
    append_jsonl(path, rec)
    line = path.read_text().replace('"duplicate_bytes": 0', '"duplicate_bytes": 0.5')
    path.write_text(line + line)
    with pytest.raises(RecordError, match=r"rounds.jsonl:1: duplicate_bytes: .*integer"):
        read_rounds(path)


# -- global adapter ------------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            2, 8, generator=gen
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            8, 2, generator=gen
        ),
    }


def test_global_adapter_round_trips_and_refuses_other_lora_settings(tmp_path: Path) -> None:
    spec = LoraSpec(r=2, alpha=4, target_modules=("q_proj",))
    g = GlobalAdapter.build(3, 7, _state(), spec=spec, base_model="tiny", chunk_size=32)
    assert g.manifest.format == "safetensors-fp16" and g.manifest.chunk_count > 1
    assert hashlib.sha256(g.payload).digest() == g.manifest.sha256
    assert len(g.payload) == g.manifest.total_size and "v0_sha256" not in g.manifest.metadata
    fp16 = adapter_from_bytes(g.payload)
    assert all(torch.allclose(fp16[k], v, atol=1e-3) for k, v in _state().items())
    derived = GlobalAdapter.build(
        3, 7, _state(), spec=spec, base_model="tiny", chunk_size=32,
        initial=InitialAdapter(5, "ab" * 32),
    )  # fmt: skip
    assert derived.manifest.metadata["init_seed"] == 5
    assert derived.manifest.metadata["v0_sha256"] == "ab" * 32
    g.save(tmp_path / "v3", spec, "tiny")
    again = GlobalAdapter.load(tmp_path / "v3", 3, 7, spec=spec, base_model="tiny", chunk_size=32)
    assert again.manifest == g.manifest  # bit-identical downlink after a restart
    with pytest.raises(LoraMismatchError):
        GlobalAdapter.load(
            tmp_path / "v3", 3, 7, spec=LoraSpec(r=4, alpha=4, target_modules=("q_proj",)),
            base_model="tiny", chunk_size=32,
        )  # fmt: skip


# -- recovery ------------------------------------------------------------------------------------


def test_a_crash_between_recording_a_global_and_finishing_its_round_is_recovered(
    tmp_path: Path, tiny_loader: Callable[[], tuple[torch.nn.Module, object]]
) -> None:
    from aggregator.adapter_model import AdapterModel
    from aggregator.round_controller import Event, RoundController
    from aggregator.store import GlobalRecord

    s = AggregatorSettings(
        state_dir=tmp_path,
        model="tiny",
        lora={"r": 2, "target_modules": ["q_proj"]},
        rounds={"clients_per_round": 1},
    )
    store = AggregatorStore(s.db_path)
    controller = RoundController(s, store, AdapterModel(tiny_loader, s.lora.spec(), 0))
    controller.load(now=1.0)
    assert controller.tick(2.0, ["a"]) is Event.OPENED
    # The close got as far as writing and recording v1, then the process died.
    v1 = GlobalAdapter.build(
        1, 1, controller.current.master, spec=s.lora.spec(), base_model="tiny", chunk_size=1024
    )
    v1.save(s.global_dir(1), s.lora.spec(), "tiny")
    store.add_global(GlobalRecord(1, 1, v1.sha256_hex, str(s.global_dir(1)), 3.0))
    store.close()

    store = AggregatorStore(s.db_path)
    again = RoundController(s, store, AdapterModel(tiny_loader, s.lora.spec(), 0))
    again.load(now=4.0)
    rec = store.get_round(1)
    assert again.round is None and again.current.version == 1
    assert rec is not None and rec.state == "closed"
    assert again.tick(5.0, ["a"]) is Event.OPENED and again.round is not None
    assert again.round.round_id == 2 and again.round.base_version == 1
    store.close()
