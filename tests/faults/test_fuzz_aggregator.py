"""Scenario 8: property-based fuzzing of everything the aggregator decodes from the network.

One real aggregator (tiny model, its own SQLite store) on the in-memory transport
(``broker.memory``); the test calls ``Aggregator.handle`` with each message and ticks the round
clock after it, as ``Aggregator.step`` does. Each hypothesis example starts a round in which one
honest device, ``good``, is selected, and interleaves its upload (manifest first, chunks in a
drawn order) with drawn garbage on every topic family the aggregator subscribes to (uploads,
fetch requests, status) and on topics it never should receive:

* random bytes;
* valid messages of every kind, encoded, then mutated (bytes flipped, cut, inserted, deleted);
* msgpack envelopes of every kind with hostile field values (huge or negative numbers, NaN,
  wrong types, long strings, nesting, missing and extra fields);
* well-formed messages with hostile meaning: uploads from clients not selected, for other
  rounds or on someone else's topic, absurd sizes, chunks of unknown uploads, fetches of any
  version with any bitmap, status messages of any state.

Properties: nothing raises and the service's catch-all (``internal_error``) never fires; a
message that cannot be parsed or decoded (predicted here with the same public decoders) is
counted under exactly its reason; every rejection counted is in the store's ledger; and the
honest upload completes, is stored byte for byte and makes global v+1 = v + its delta.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import pytest
import torch
from e2e_support import LORA, expected_global, tiny_loader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from report import FaultRow
from service_support import FakeClock, compressed, random_delta

from aggregator.downlink import plan_id
from aggregator.round_result import read_rounds
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.chunking import crc32, upload_messages
from broker.codec import KINDS, decode, encode
from broker.errors import TopicError, WireError
from broker.memory import MemoryBroker, MemoryClient
from broker.messages import (
    MAX_CHUNKS,
    PROTOCOL_VERSION,
    AckStatus,
    ClientState,
    ClientStatus,
    DownlinkRoute,
    FetchRequest,
    RoundPhase,
    UploadAck,
    UploadChunk,
    UploadManifest,
    WireMessage,
    chunk_count_for,
)
from broker.settings import MqttSettings
from broker.topics import (
    FetchTopic,
    StatusTopic,
    UploadTopic,
    ack_topic,
    down_topic,
    global_manifest_topic,
    parse_topic,
    round_topic,
    status_topic,
    upload_topic,
)
from broker.transport import Message

FLEET = "fuzz"
GOOD = "good"
OTHERS = ("evil", "mallory", "x" * 64, "a.b-c_d")  # never ``good``: its topics are its own (ACL)
TTL_S = 10.0
TIMEOUT_S = 5.0
#: Counters that are not rejections (so not in the store's ledger).
NOT_REJECTIONS = ("stale_fetch", "internal_error")
#: Examples in the default run / the slow run.
QUICK, THOROUGH = 200, 3000
SHM = "/dev/shm"


# -- the service under test --------------------------------------------------------------------


class Harness:
    """An aggregator on a memory broker, driven message by message on a fake clock."""

    def __init__(self, state_dir: Path) -> None:
        self.clock = FakeClock()
        self.broker = MemoryBroker(max_packet_size=None)
        fields: dict[str, Any] = {
            "fleet": FLEET, "mqtt": {"client_id": "aggregator-fuzz"}, "state_dir": state_dir,
            "model": "tiny", "lora": LORA, "chunk_size": 512,
            "rounds": {"clients_per_round": 64, "min_clients": 1, "quorum": 1,
                       "round_timeout_s": TIMEOUT_S, "max_extensions": 0,
                       "heartbeat_ttl_s": TTL_S, "budget_bytes": None, "max_rounds": 0},
        }  # fmt: skip
        self.settings = AggregatorSettings(**fields)
        self.agg = Aggregator(
            self.settings,
            client_factory=lambda mqtt: MemoryClient(self.broker, mqtt),
            clock=self.clock,
            model_loader=tiny_loader,
        )
        self.good = MemoryClient(self.broker, MqttSettings(client_id=GOOD, clean_start=True))
        self.good.connect()
        self.good.subscribe(ack_topic(FLEET, GOOD))
        self.agg.start()
        #: good's acknowledged uploads: (round, SHA-256 of the payload it produced)
        self.acked: list[tuple[int, str]] = []
        self.v0 = self.agg.rounds.current.manifest.sha256

    def close(self) -> None:
        self.good.close()
        self.agg.close()

    def feed(self, msg: Message) -> None:
        self.agg.handle(msg)
        self.agg.tick(self.clock())

    def fresh_round(self) -> tuple[int, int]:
        """End whatever round is open, let every heartbeat but good's expire, open a round."""
        agg = self.agg
        while agg.open_round is not None:  # deadline: closes on quorum or fails (no extensions)
            self.clock.advance(TIMEOUT_S + 1)
            agg.tick(self.clock())
        self.clock.advance(TTL_S + 1)
        status = ClientStatus(client=GOOD, state=ClientState.ONLINE, timestamp=self.clock())
        self.feed(message(status_topic(FLEET, GOOD), encode(status)))
        rnd = agg.rounds.round
        assert rnd is not None and rnd.state.selected == {GOOD}, "the honest round did not open"
        return rnd.round_id, rnd.base_version

    def acks(self) -> list[UploadAck]:
        return [decode(m.payload, expect=UploadAck) for m in self.good.messages(0)]


def message(topic: str, payload: bytes, **props: Any) -> Message:
    return Message(topic, payload, props.get("qos", 1), props.get("retain", False),
                   props.get("user_properties", ()), props.get("expiry_s"))  # fmt: skip


def predicted_reason(msg: Message) -> str | None:
    """The rejection a message must be counted under, if parsing or decoding alone decides it."""
    try:
        topic = parse_topic(msg.topic)
    except TopicError as exc:
        return exc.reason
    expect: type[WireMessage] | None
    if isinstance(topic, UploadTopic):
        expect = None
    elif isinstance(topic, FetchTopic):
        expect = FetchRequest
    elif isinstance(topic, StatusTopic):
        expect = ClientStatus
    else:
        return None
    try:
        body = decode(msg.payload, expect=expect)
    except WireError as exc:
        return exc.reason
    if isinstance(topic, UploadTopic):
        if not isinstance(body, UploadManifest | UploadChunk):
            return "unexpected_kind"
        if (body.client, body.round) != (topic.client, topic.round):
            return "origin"
    if isinstance(body, ClientStatus) and isinstance(topic, StatusTopic):
        return "origin" if body.client != topic.client else None
    return None


def ignored(msg: Message) -> bool:
    """A topic of a family the aggregator does not serve (it never subscribes to them)."""
    try:
        return not isinstance(parse_topic(msg.topic), UploadTopic | FetchTopic | StatusTopic)
    except TopicError:
        return False


# -- strategies ----------------------------------------------------------------------------------

ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from((0, 1, -1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63))),
)
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(), st.text(max_size=300), st.binary(max_size=600)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
#: A round (or global version) relative to the open one (-1: the previous, ...) or absolute.
_relative = st.sampled_from(("-1", "+0", "+0", "+0", "+1", "0", "1", str(2**63 - 1)))
rounds = st.one_of(_relative, _relative, _relative, st.integers(0, 2**63 - 1).map(str))


class At(NamedTuple):
    """Where the aggregator is when a message is sent: the open round, the global version, and
    the ids of v0 and of the current global (states a fetch may claim to hold, so that plan
    requests get catch-ups and ``none`` as well as full adapters)."""

    round: int
    version: int
    states: tuple[bytes, bytes] = (bytes(32), bytes(32))


#: A held state or plan id drawn as a name, resolved when the message is built.
_STATE_NAMES = ("v0", "current", "full_plan")


def resolve_state(value: Any, at: At) -> Any:
    """``v0``/``current``: those states' ids; ``full_plan``: the current full plan's id."""
    if value == "v0":
        return at.states[0]
    if value == "current":
        return at.states[1]
    if value == "full_plan":
        return plan_id(DownlinkRoute.FULL, at.states[1], None, 0, "")
    return value


# The strategies below draw *recipes*: functions of ``At``, so that what hypothesis draws never
# depends on the aggregator's state (which moves on from example to example).
Recipe = Callable[[At], Any]


def resolve(r: str, now: int) -> int:
    return max(0, now + int(r)) if r[0] in "+-" else int(r)


FAMILIES = ("up", "up", "up", "fetch", "fetch", "status", "other")


@st.composite
def topics(draw: st.DrawFn, family: str, client: str, r: str) -> Recipe:
    """A topic of ``family``: mostly well-formed and of this fleet, some broken."""
    fleet = draw(st.sampled_from((FLEET,) * 14 + ("bad/fleet", "+")))
    if family == "up":
        return lambda at: f"fstq/v1/{fleet}/up/{client}/{resolve(r, at.round)}"
    if family in ("fetch", "status"):
        topic = f"fstq/v1/{fleet}/{family}/{client}"
        return lambda _: topic
    fixed = st.sampled_from(
        (round_topic(FLEET), global_manifest_topic(FLEET), ack_topic(FLEET, client),
         down_topic(FLEET, client), f"fstq/v1/{FLEET}/up/{client}",
         f"fstq/v1/{FLEET}/up/{client}/01", f"fstq/v1/{FLEET}/up/{client}/-1",
         f"fstq/v1/{FLEET}/up/{client}/1/x", f"fstq/v1/{FLEET}/fetch",
         f"fstq/v1/{FLEET}/status/{client}/x", f"fstq/v2/{FLEET}/up/{client}/1",
         f"fstq/v1/{FLEET}/up/{client}/{2**63}", "", "/", "fstq/v1")
    )  # fmt: skip
    topic = draw(
        st.one_of(
            fixed, st.text(max_size=80), st.lists(st.text(max_size=12), max_size=7).map("/".join)
        )
    )
    return lambda _: topic


@st.composite
def _sizes(draw: st.DrawFn) -> dict[str, int]:
    """Consistent transfer sizes, from empty to the protocol's limit."""
    total = draw(st.sampled_from((0, 1, 600, 4096, 1 << 20, 64 << 20, 1 << 30)))
    size = max(draw(st.sampled_from((1, 512, 1024, 1 << 20))), -(-total // MAX_CHUNKS))
    return {"total_size": total, "chunk_count": chunk_count_for(total, size), "chunk_size": size}


@st.composite
def _chunk_data(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(st.binary(max_size=600))
    return {"data": data, "crc32": draw(st.sampled_from((crc32(data), 0)))}


def _with(fields: dict[str, st.SearchStrategy[Any]], *more: st.SearchStrategy[Any]) -> Any:
    return st.tuples(st.fixed_dictionaries(fields), *more).map(
        lambda parts: {k: v for part in parts for k, v in part.items()}
    )


_UPLOAD_IDS = st.sampled_from(("u1", "good-upload", "x" * 64))
_SHA = st.binary(min_size=32, max_size=32)
#: Per kind, its fields but ``round`` and ``client`` (set from the topic, mostly); version
#: fields are drawn relative to the current global version, like rounds.
_FIELDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "up.manifest": _with(
        {"upload_id": _UPLOAD_IDS, "base_version": rounds, "sha256": _SHA,
         "sample_count": st.integers(0, 2**63 - 1),
         "method": st.sampled_from(("dense_fp32", "fstq", "qsgd", "topk", "nope"))},
        _sizes(),
    ),
    "up.chunk": _with(
        {"upload_id": _UPLOAD_IDS, "index": st.integers(0, 2**16 - 1)}, _chunk_data()
    ),
    # Plan requests and chunk requests, holding nothing, v0, a random state or the global's id
    # (drawn as the current version's, relative like rounds), for random or real plan ids.
    "fetch": _with({"version": st.just("+0") | rounds, "wanted": st.binary(max_size=64),
                    "held": st.sampled_from(("v0", "v0", "current", None)) | _SHA,
                    "plan": st.sampled_from((None, None, None, "full_plan")) | _SHA}),
    "down.plan": _with(
        {"version": rounds, "route": st.just(DownlinkRoute.CATCHUP), "plan": _SHA, "base": _SHA,
         "result": _SHA, "sha256": _SHA}, _sizes()),
    "status": _with({"state": st.sampled_from(ClientState), "timestamp": st.floats(0, 1e10)}),
    "up.ack": _with({"upload_id": _UPLOAD_IDS, "status": st.sampled_from(AckStatus),
                     "chunk_count": st.just(0), "have": st.just(b"")}),
    "round": _with(
        {"fleet": st.just(FLEET), "global_version": rounds, "global_sha256": _SHA,
         "selected": st.sampled_from(((), OTHERS[:1])), "deadline": st.floats(0, 1e10),
         "quorum": st.just(1), "upload_window_s": st.just(1.0), "chunk_size": st.just(512),
         "budget_bytes": st.just({})},
    ),
    "global.manifest": _with({"version": rounds, "sha256": _SHA, "format": st.just("x")},
                             _sizes()),
    "global.chunk": _with({"version": rounds, "plan": _SHA, "index": st.integers(0, 2**16 - 1)},
                          _chunk_data()),
    # The aggregator's own observer message: another sender's on a device topic is garbage.
    "progress": _with(
        {"fleet": st.just(FLEET), "phase": st.sampled_from(RoundPhase), "base_version": rounds,
         "selected": st.just(OTHERS[:1]), "arrived": st.just(()), "rejected": st.just(0),
         "late": st.just(0), "opened_at": st.floats(0, 1e10), "deadline": st.floats(0, 1e10),
         "uplink_wire_bytes": st.just(0), "downlink_wire_bytes": st.just(0),
         "timestamp": st.floats(0, 1e10)},
    ),
}  # fmt: skip
_VERSIONS = ("base_version", "version", "global_version")


@st.composite
def valid_messages(draw: st.DrawFn, family: str, client: str, r: str) -> Recipe:
    """Well-formed messages, mostly of the kinds ``family`` carries and naming the topic's
    ``client`` and round ``r``; with hostile meaning where they can have one."""
    carried = {"up": ("up.manifest", "up.chunk"), "fetch": ("fetch",), "status": ("status",)}
    kind = draw(st.sampled_from(carried.get(family, ()) * 8 + tuple(sorted(KINDS))))
    cls = KINDS[kind]
    fields = draw(_FIELDS[kind])
    named = {
        "client": draw(st.sampled_from((client,) * 3 + (*OTHERS, GOOD))),
        "round": draw(st.one_of(st.just(r), st.just(r), rounds)),
    }

    def build(at: At) -> WireMessage:
        values = {k: resolve(v, at.version) if k in _VERSIONS else resolve_state(v, at)
                  for k, v in fields.items()}  # fmt: skip
        if "client" in cls.model_fields:
            values["client"] = named["client"]
        if "round" in cls.model_fields:
            values["round"] = resolve(named["round"], at.round)
        return cls.model_validate(values)

    return build


@st.composite
def hostile_envelopes(draw: st.DrawFn, valid: Recipe) -> Recipe:
    """A msgpack map shaped like a message, some fields replaced, dropped or added."""
    keys = sorted(msgpack.unpackb(encode(valid(At(0, 0)))))  # the same whatever the round
    changes = draw(st.lists(st.tuples(st.sampled_from(keys), st.none() | values), max_size=4))
    extra = draw(st.dictionaries(st.one_of(st.text(max_size=10), ints), values, max_size=2))

    def build(at: At) -> bytes:
        body: dict[Any, Any] = {"v": PROTOCOL_VERSION, **msgpack.unpackb(encode(valid(at)))}
        for key, value in changes:  # None: drop the field
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        packed = msgpack.packb({**body, **extra}, use_bin_type=True)
        assert isinstance(packed, bytes)
        return packed

    return build


@st.composite
def mutated(draw: st.DrawFn, valid: Recipe) -> Recipe:
    """An encoded valid message with a few byte-level mutations (positions taken modulo)."""
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(("flip", "cut", "insert", "delete", "append")),
                st.integers(0, 2**16),
                st.binary(min_size=1, max_size=8),
            ),
            min_size=1,
            max_size=4,
        )
    )

    def build(at: At) -> bytes:
        data = bytearray(encode(valid(at)))
        for op, where, junk in ops:
            pos = where % (len(data) + 1)
            if op == "flip" and data:
                data[pos % len(data)] ^= junk[0] or 1
            elif op == "cut":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = junk
            elif op == "delete":
                del data[pos : pos + len(junk)]
            else:
                data += junk
        return bytes(data)

    return build


@st.composite
def garbage(draw: st.DrawFn) -> Callable[[At], Message]:
    family, client, r = draw(st.sampled_from(FAMILIES)), draw(st.sampled_from(OTHERS)), draw(rounds)
    topic = draw(topics(family, client, r))
    valid = draw(valid_messages(family, client, r))
    encoded: Recipe = lambda at: encode(valid(at))  # noqa: E731
    payload = draw(
        st.one_of(
            st.binary(max_size=2048).map(lambda b: lambda _: b),
            mutated(valid),
            hostile_envelopes(valid),
            st.just(encoded),
            st.just(encoded),
            st.just(encoded),
        )
    )
    props = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "qos": st.integers(0, 2),
                "retain": st.booleans(),
                "user_properties": st.lists(
                    st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=3
                ).map(tuple),
                "expiry_s": st.none() | st.integers(0, 2**32 - 1),
            },
        )
    )
    return lambda at: message(topic(at), payload(at), **props)


# -- the property --------------------------------------------------------------------------------


def fuzz(harness: Harness, examples: int) -> Counter[str]:
    """Run the property ``examples`` times; returns how often each reason was predicted."""
    seen: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        agg = harness.agg
        round_id, base = harness.fresh_round()
        start = dict(agg.rounds.current.master)
        seed = data.draw(st.integers(0, 2**16), label="seed")
        method = data.draw(st.sampled_from(("dense_fp32", "dense_fp16", "fstq")), label="method")
        samples = data.draw(st.integers(1, 1000), label="samples")
        payload = compressed(random_delta(dict(sorted(start.items())), seed), method)
        manifest, chunks = upload_messages(
            payload, upload_id="good-upload", round_id=round_id, client=GOOD,
            base_version=base, sample_count=samples, method=method, chunk_size=512,
        )  # fmt: skip
        topic = upload_topic(FLEET, GOOD, round_id)
        order: list[UploadChunk] = data.draw(st.permutations(chunks), label="chunk order")
        sent: list[WireMessage] = [manifest, *order]
        honest = [message(topic, encode(m)) for m in sent]
        feed: list[tuple[Message, bool]] = [(m, False) for m in honest]
        for junk in data.draw(st.lists(garbage(), min_size=1, max_size=12), label="garbage"):
            at = At(round_id, base, (harness.v0, agg.rounds.current.manifest.sha256))
            feed.insert(data.draw(st.integers(0, len(feed))), (junk(at), True))
        harness.acks()  # drop answers of earlier examples
        closed_with: dict[str, torch.Tensor] | None = None
        for msg, is_junk in feed:
            before = Counter(agg.counters)
            version = agg.global_version
            harness.feed(msg)
            after = agg.counters
            assert after["internal_error"] == 0, msg
            if agg.global_version != version and closed_with is None:  # good's round closed
                closed_with = dict(agg.rounds.current.master)
            if not is_junk:
                continue
            reason = predicted_reason(msg)
            if reason is not None:
                seen[reason] += 1
                assert after[reason] == before[reason] + 1, (reason, msg)
            elif ignored(msg):
                assert after == before, msg
        # The honest upload completed, was stored as sent, and alone made the next global.
        assert any(a.upload_id == "good-upload" and a.status is AckStatus.COMPLETE
                   for a in harness.acks()), "the honest upload was never acknowledged"  # fmt: skip
        stored = agg.rounds.store.accepted_upload(round_id, GOOD)
        assert stored is not None and stored.payload == payload
        assert stored.sha256 == hashlib.sha256(payload).hexdigest()
        harness.acked.append((round_id, stored.sha256))
        assert closed_with is not None, "the honest round did not close"
        want = expected_global(start, [(payload, samples)])
        for k in want:
            torch.testing.assert_close(closed_with[k], want[k], atol=1e-6, rtol=0)

    example()
    return seen


def audit(harness: Harness, examples: int) -> FaultRow:
    """The store against the counters and against what ``good`` produced; the table row."""
    counters = harness.agg.counters
    rejections = sum(n for k, n in counters.items()
                     if k not in NOT_REJECTIONS and not k.endswith("_chunks"))  # fmt: skip
    store = AggregatorStore(harness.settings.db_path)
    try:
        # Every rejection the service counted is in its store's ledger, and nothing else is.
        assert sum(store.rejection_counts().values()) == rejections
        stored = {r: store.accepted_upload(r, GOOD) for r, _ in harness.acked}
        rounds = sum(r.state == "closed" for r in store.rounds())
    finally:
        store.close()
    # The fetches among the garbage got every kind of plan (a catch-up from a v0 they claimed
    # to hold, nothing for the current global's id, the full adapter for anything else).
    plans: Counter[str] = Counter()
    for rec in read_rounds(harness.settings.rounds_path):
        for route, t in (rec.downlink.routes if rec.downlink else {}).items():
            plans[route] += t.fetches
    # A few a quick run (not every route every time); all of them in the thorough one.
    assert set(plans) >= ({"catchup", "none", "full"} if examples >= THOROUGH else {"full"})
    lost = sum(stored[r] is None for r, _ in harness.acked)
    corrupted = sum(
        (up := stored[r]) is not None and hashlib.sha256(up.payload).hexdigest() != sha
        for r, sha in harness.acked
    )
    assert corrupted == 0 and lost == 0
    assert len(harness.acked) >= examples  # hypothesis may run more (shrinking, replays)
    return FaultRow(
        scenario="8 fuzzed aggregator input",
        rounds_completed=rounds,
        uploads_acknowledged=len(harness.acked),
        uploads_aggregated=len(harness.acked) - lost,
        bytes_resent=0,  # the honest device sends each chunk once
        corrupted_aggregated=corrupted,
        acknowledged_lost=lost,
        notes=f"{examples} examples; {rejections} garbage messages rejected by reason, "
        f"{counters['internal_error']} internal errors; downlink plans served: "
        + ", ".join(f"{n} {route}" for route, n in sorted(plans.items())),
    )


@contextlib.contextmanager
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A RAM-backed directory where there is one: the store's fsyncs (one per rejection and
    round) would otherwise dominate the run; this property is about decoding, not durability."""
    if not os.access(SHM, os.W_OK):
        yield tmp_path / "agg"
        return
    with tempfile.TemporaryDirectory(dir=SHM, prefix="fstq-fuzz-") as directory:
        yield Path(directory)


def run(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault_report: Callable[[FaultRow], None],
    examples: int,
) -> None:
    caplog.set_level(logging.ERROR, logger="aggregator")
    with state_dir(tmp_path) as directory:
        harness = Harness(directory)
        try:
            seen = fuzz(harness, examples)
            row = audit(harness, examples)
        finally:
            harness.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    # The garbage reached the decoders it was meant for: each main reason came up.
    for reason in ("bad_topic", "malformed", "invalid_fields", "origin"):
        assert seen[reason] > 0, seen
    print(f"rejections predicted and counted: {dict(seen)}")
    fault_report(row)


@pytest.mark.timeout(240)
def test_garbage_on_every_topic_never_breaks_the_aggregator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault_report: Callable[[FaultRow], None]
) -> None:
    run(tmp_path, caplog, fault_report, QUICK)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_garbage_on_every_topic_never_breaks_the_aggregator_thorough(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault_report: Callable[[FaultRow], None]
) -> None:
    run(tmp_path, caplog, fault_report, THOROUGH)
