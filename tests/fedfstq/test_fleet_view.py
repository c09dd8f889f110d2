"""FleetView: the observer's fold over the broker's messages (no broker needed: it is pure)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import topics
from broker.codec import encode
from broker.messages import (
    ClientState,
    ClientStatus,
    GlobalManifest,
    RoundAnnouncement,
    RoundPhase,
    RoundProgress,
)
from broker.progress import CAUSE_KEY, DeviceProgress, OfflineCause, Stage
from fedfstq.fleet_render import describe, render
from fedfstq.fleet_view import (
    DeviceChanged,
    FleetView,
    GlobalChanged,
    Ignored,
    RoundChanged,
)

FLEET = "demo"
T0 = 1_767_225_600.0
SHA = hashlib.sha256(b"v1").digest()


def announcement(round_id: int = 2, selected: tuple[str, ...] = ("a", "b", "c")) -> bytes:
    return encode(
        RoundAnnouncement(
            fleet=FLEET,
            round=round_id,
            global_version=round_id - 1,
            global_sha256=SHA,
            selected=selected,
            deadline=T0 + 300,
            quorum=2,
            upload_window_s=300.0,
            chunk_size=1024,
            budget_bytes={},
        )
    )


def progress(
    round_id: int = 2,
    arrived: tuple[str, ...] = (),
    phase: RoundPhase = RoundPhase.OPEN,
    uplink: int = 0,
    deadline: float = T0 + 300,
) -> bytes:
    return encode(
        RoundProgress(
            fleet=FLEET,
            round=round_id,
            phase=phase,
            base_version=round_id - 1,
            selected=("a", "b", "c"),
            arrived=arrived,
            rejected=0,
            late=0,
            opened_at=T0,
            deadline=deadline,
            uplink_wire_bytes=uplink,
            downlink_wire_bytes=3 * 4096,
            timestamp=T0 + 1,
        )
    )


def status(
    client: str,
    state: ClientState,
    *,
    at: float = T0,
    p: DeviceProgress | None = None,
    cause: OfflineCause | None = None,
    round_id: int | None = 2,
) -> bytes:
    info: dict[str, str | int | float | bool] = {"global_version": 1}
    if p is not None:
        info.update(p.to_info())
    if cause is not None:
        info[CAUSE_KEY] = cause.value
    return encode(ClientStatus(client=client, state=state, timestamp=at, round=round_id, info=info))


def manifest(version: int = 1) -> bytes:
    return encode(
        GlobalManifest(
            version=version,
            round=version,
            total_size=4096,
            chunk_count=4,
            chunk_size=1024,
            sha256=SHA,
            format="safetensors-fp16",
        )
    )


ROUND, PROGRESS = topics.round_topic(FLEET), topics.progress_topic(FLEET)
GLOBAL = topics.global_manifest_topic(FLEET)


def status_topic(client: str) -> str:
    return topics.status_topic(FLEET, client)


def test_a_round_in_progress_as_an_operator_sees_it() -> None:
    # Arrange
    view = FleetView(FLEET)
    training = DeviceProgress(Stage.TRAINING, 3, 6, 2.5)
    # Act
    view.apply(GLOBAL, manifest(1), T0)
    view.apply(ROUND, announcement(), T0)
    view.apply(PROGRESS, progress(arrived=("b",), uplink=700_000), T0 + 5)
    view.apply(status_topic("a"), status("a", ClientState.TRAINING, p=training), T0 + 6)
    view.apply(status_topic("b"), status("b", ClientState.IDLE), T0 + 7)
    snap = view.snapshot(T0 + 10)
    # Assert
    assert snap.global_adapter is not None and snap.global_adapter.sha256 == SHA.hex()
    rnd = snap.round
    assert rnd is not None
    assert (rnd.round, rnd.phase, rnd.selected, rnd.arrived) == (
        2, RoundPhase.OPEN, ("a", "b", "c"), ("b",)
    )  # fmt: skip
    assert (rnd.quorum, rnd.uplink_wire_bytes, rnd.downlink_wire_bytes) == (2, 700_000, 12_288)
    assert snap.seconds_left() == pytest.approx(290.0)
    a, b = snap.devices
    assert (a.client, a.state, a.progress, a.last_seen) == ("a", ClientState.TRAINING, training,
                                                              T0 + 6)  # fmt: skip
    assert (b.client, b.connection(T0 + 10), a.global_version) == ("b", "online", 1)
    doc = snap.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["round"]["arrived"] == ["b"] and doc["devices"][0]["progress"]["done"] == 3


def test_an_announcement_without_progress_yet_is_an_open_round_with_no_arrivals() -> None:
    view = FleetView(FLEET)
    view.apply(PROGRESS, progress(round_id=1, phase=RoundPhase.CLOSED, arrived=("a",)), T0)
    (update,) = view.apply(ROUND, announcement(round_id=2), T0 + 1)
    assert isinstance(update, RoundChanged)
    assert update.before is not None and update.before.phase is RoundPhase.CLOSED
    after = update.after
    assert (after.round, after.phase, after.arrived, after.uplink_wire_bytes) == (
        2, RoundPhase.OPEN, (), None
    )  # fmt: skip


def test_heartbeats_update_last_seen_without_an_update_and_stages_make_one() -> None:
    view = FleetView(FLEET)
    first = view.apply(status_topic("a"), status("a", ClientState.IDLE), T0)
    again = view.apply(status_topic("a"), status("a", ClientState.IDLE, at=T0 + 15), T0 + 15)
    step = DeviceProgress(Stage.TRAINING, 1, 6, 3.0)
    moved = view.apply(status_topic("a"), status("a", ClientState.TRAINING, p=step), T0 + 16)
    assert [type(u) for u in first] == [DeviceChanged]
    assert again == []
    assert view.snapshot(T0 + 16).devices[0].last_seen == T0 + 16
    (update,) = moved
    assert isinstance(update, DeviceChanged) and update.after is not None
    assert update.after.progress == step


def test_retained_statuses_count_from_their_own_time_and_devices_fall_silent() -> None:
    view = FleetView(FLEET, silent_after_s=60)
    view.apply(status_topic("a"), status("a", ClientState.IDLE, at=T0 - 100), T0, retained=True)
    view.apply(status_topic("b"), status("b", ClientState.IDLE, at=T0 + 999), T0, retained=True)
    a, b = view.snapshot(T0).devices
    assert (a.last_seen, a.connection(T0, 60)) == (T0 - 100, "silent")
    assert (b.last_seen, b.connection(T0, 60)) == (T0, "online")  # a clock ahead is capped


def test_a_will_is_no_sign_of_life_and_a_goodbye_is() -> None:
    view = FleetView(FLEET)
    view.apply(status_topic("a"), status("a", ClientState.IDLE), T0)
    will = status("a", ClientState.OFFLINE, at=T0 - 500, cause=OfflineCause.LINK_LOST)
    view.apply(status_topic("a"), will, T0 + 40)
    will_b = status("b", ClientState.OFFLINE, at=T0 - 500, cause=OfflineCause.LINK_LOST)
    view.apply(status_topic("b"), will_b, T0 + 40, retained=True)
    bye = status("c", ClientState.OFFLINE, at=T0 + 30, cause=OfflineCause.STOPPED)
    view.apply(status_topic("c"), bye, T0 + 40, retained=True)
    a, b, c = view.snapshot(T0 + 40).devices
    assert (a.connection(T0 + 40), a.last_seen, a.cause) == ("offline", T0, "link_lost")
    assert (b.client, b.last_seen) == ("b", None)
    assert (c.last_seen, c.cause) == (T0 + 30, "stopped")
    assert "connection lost" in render_text(view, T0 + 40)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (status_topic("a"), status("b", ClientState.IDLE), "bad_topic"),  # not its topic
        (status_topic("a"), b"\xc1garbage", "malformed"),
        (ROUND, manifest(1), "unexpected_kind"),
        (topics.round_topic("other"), announcement(), "bad_topic"),  # another fleet
        (topics.ack_topic(FLEET, "a"), b"x", "bad_topic"),  # not an observer topic
        ("not/a/topic", b"x", "bad_topic"),
    ],
)
def test_what_it_does_not_understand_is_counted_never_raised(
    topic: str, payload: bytes, reason: str
) -> None:
    view = FleetView(FLEET)
    assert view.apply(topic, payload, T0) == [Ignored(topic, reason)]
    snap = view.snapshot(T0)
    assert (snap.ignored, snap.devices, snap.round) == (1, (), None)


def test_a_cleared_retained_status_removes_the_device() -> None:
    view = FleetView(FLEET)
    view.apply(status_topic("a"), status("a", ClientState.IDLE), T0)
    (update,) = view.apply(status_topic("a"), b"", T0 + 1)
    assert isinstance(update, DeviceChanged) and update.after is None
    assert view.snapshot(T0 + 1).devices == ()
    assert view.apply(ROUND, b"", T0) == []


def test_log_lines_say_who_does_what_and_bytes_alone_make_none() -> None:
    view = FleetView(FLEET)
    lines = []
    sequence = [
        (GLOBAL, manifest(1)),
        (ROUND, announcement()),
        (PROGRESS, progress()),
        (status_topic("a"), status("a", ClientState.TRAINING,
                                   p=DeviceProgress(Stage.TRAINING, 2, 6, 2.25))),
        (PROGRESS, progress(uplink=1000)),
        (PROGRESS, progress(arrived=("a",), uplink=2000)),
        (PROGRESS, progress(arrived=("a",), uplink=2000, deadline=T0 + 360)),
        (PROGRESS, progress(arrived=("a", "b", "c"), phase=RoundPhase.CLOSED, uplink=9000)),
    ]  # fmt: skip
    for topic, payload in sequence:
        for u in view.apply(topic, payload, T0 + 10):
            lines.append(describe(u, T0 + 10))
    assert lines == [
        f"global adapter v1 published (sha256 {SHA.hex()[:12]}, 4,096 B)",
        "round 2 opened on v1: selected a, b, c; deadline in 5 min",
        None,  # the first progress of the round: nothing new to say
        "a round 2: training step 2/6, loss 2.250",
        None,  # only bytes moved
        "round 2: a arrived (1/3), deadline in 5 min",
        "round 2: deadline extended, now in 6 min",
        "round 2 closed (on v1); 3/3 arrived (a, b, c); uplink 9,000 B, downlink 12,288 B",
    ]


def render_text(view: FleetView, now: float) -> str:
    import io

    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(render(view.snapshot(now)))
    return console.export_text()


def test_the_table_shows_every_device_and_the_round() -> None:
    view = FleetView(FLEET)
    view.apply(ROUND, announcement(), T0)
    view.apply(status_topic("a"), status("a", ClientState.UPLOADING,
                                         p=DeviceProgress(Stage.UPLOADING, 1, 3)), T0)  # fmt: skip
    text = render_text(view, T0 + 60)
    assert "round 2 open (on v1); 0/3 arrived; deadline in 4 min" in text
    assert "uploading, 1/3 chunks through to the broker" in text
    assert "a *" in text  # selected


# -- properties ------------------------------------------------------------------------------

clients = st.sampled_from(["a", "b", "c", "d"])
stages = st.builds(
    DeviceProgress,
    stage=st.sampled_from(Stage),
    done=st.integers(0, 50),
    total=st.integers(0, 50),
    loss=st.none() | st.floats(0, 20, allow_nan=False),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["status", "round", "progress", "global"]))
    if kind == "status":
        c = draw(clients)
        state = draw(st.sampled_from(ClientState))
        cause = draw(st.sampled_from(OfflineCause)) if state is ClientState.OFFLINE else None
        p = draw(st.none() | stages) if cause is None else None
        at = draw(st.floats(T0 - 1000, T0 + 1000))
        return status_topic(c), status(c, state, at=at, p=p, cause=cause)
    r = draw(st.integers(1, 5))
    if kind == "round":
        return ROUND, announcement(round_id=r)
    if kind == "progress":
        arrived = tuple(x for x in ("a", "b", "c") if draw(st.booleans()))
        phase = draw(st.sampled_from(RoundPhase))
        return PROGRESS, progress(round_id=r, arrived=arrived, phase=phase)
    return GLOBAL, manifest(draw(st.integers(0, 5)))


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(messages(), max_size=30), retained=st.booleans())
def test_any_sequence_folds_into_a_consistent_snapshot(
    msgs: list[tuple[str, bytes]], retained: bool
) -> None:
    view = FleetView(FLEET)
    for i, (topic, payload) in enumerate(msgs):
        for u in view.apply(topic, payload, T0 + i, retained=retained):
            assert not isinstance(u, Ignored)
            assert isinstance(u, DeviceChanged | RoundChanged | GlobalChanged)
            assert describe(u, T0 + i) is None or isinstance(describe(u, T0 + i), str)
    now = T0 + len(msgs)
    snap = view.snapshot(now)
    names = [d.client for d in snap.devices]
    assert names == sorted(set(names))
    for d in snap.devices:
        assert d.last_seen is None or d.last_seen <= now
        assert d.connection(now) in ("online", "silent", "offline")
    if snap.round is not None:
        assert set(snap.round.arrived) <= set(snap.round.selected)
    doc = snap.to_json()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(messages(), max_size=20, unique_by=lambda m: m[0]), data=st.data())
def test_messages_on_different_topics_fold_the_same_in_any_order(
    msgs: list[tuple[str, bytes]], data: st.DataObject
) -> None:
    # Retained state arrives in whatever order the broker sends it: the picture must not depend
    # on it (the round merges announcement and progress by round number, not by arrival).
    shuffled = data.draw(st.permutations(msgs))
    views = [FleetView(FLEET), FleetView(FLEET)]
    for view, order in zip(views, (msgs, shuffled), strict=True):
        for topic, payload in order:
            view.apply(topic, payload, T0, retained=True)
    assert views[0].snapshot(T0) == views[1].snapshot(T0)


@settings(max_examples=100, deadline=None)
@given(msg=messages())
def test_the_same_message_twice_changes_nothing_the_second_time(msg: tuple[str, bytes]) -> None:
    view = FleetView(FLEET)
    view.apply(*msg, T0)
    assert view.apply(*msg, T0) == []


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=200), topic=st.sampled_from([ROUND, PROGRESS, GLOBAL,
                                                              status_topic("a")]))  # fmt: skip
def test_random_bytes_are_ignored_never_raised(payload: bytes, topic: str) -> None:
    view = FleetView(FLEET)
    updates = view.apply(topic, payload, T0)
    assert all(isinstance(u, Ignored | DeviceChanged) for u in updates)


def test_progress_info_round_trips_and_bad_info_is_no_progress() -> None:
    p = DeviceProgress(Stage.TRAINING, 2, 6, 1.23456)
    assert DeviceProgress.from_info(p.to_info()) == DeviceProgress(Stage.TRAINING, 2, 6, 1.2346)
    assert DeviceProgress(Stage.TRAINING, 1, 6, math.nan).to_info().get("loss") is None
    for bad in ({}, {"stage": "dancing"}, {"stage": "training", "done": -1},
                {"stage": "training", "total": True}, {"stage": 3}):  # fmt: skip
        assert DeviceProgress.from_info(bad) is None  # type: ignore[arg-type]
