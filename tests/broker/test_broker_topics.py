"""Topic namespace: build/parse round trips, rejections, filters, MQTT matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import topics as t
from broker.errors import TopicError

ids = st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")
rounds = st.integers(min_value=0, max_value=t.MAX_ROUND)
FAMILIES = (
    t.RoundTopic,
    t.GlobalManifestTopic,
    t.UploadTopic,
    t.AckTopic,
    t.FetchTopic,
    t.DownTopic,
    t.StatusTopic,
    t.ProgressTopic,
)
bad_ids = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=80, alphabet="abc"),
    st.text(min_size=1, max_size=20).filter(lambda s: t.ID_PATTERN.fullmatch(s) is None),
)


@given(fleet=ids, client=ids, round_id=rounds)
def test_every_family_round_trips(fleet: str, client: str, round_id: int) -> None:
    # Arrange
    objects = [
        t.RoundTopic(fleet),
        t.GlobalManifestTopic(fleet),
        t.UploadTopic(fleet, client, round_id),
        t.AckTopic(fleet, client),
        t.FetchTopic(fleet, client),
        t.DownTopic(fleet, client),
        t.StatusTopic(fleet, client),
        t.ProgressTopic(fleet),
    ]
    for obj in objects:
        # Act
        text = str(obj)
        # Assert
        assert t.parse_topic(text) == obj
        assert t.topic_as(text, type(obj)) == obj
        assert text.startswith(f"fstq/v1/{fleet}/")


@given(fleet=ids, client=ids, round_id=rounds)
def test_builders_and_parsers_agree(fleet: str, client: str, round_id: int) -> None:
    assert t.parse_topic(t.round_topic(fleet)) == t.RoundTopic(fleet)
    assert t.parse_topic(t.global_manifest_topic(fleet)) == t.GlobalManifestTopic(fleet)
    up = t.topic_as(t.upload_topic(fleet, client, round_id), t.UploadTopic)
    assert up is not None and (up.fleet, up.client, up.round) == (fleet, client, round_id)
    assert t.parse_topic(t.ack_topic(fleet, client)) == t.AckTopic(fleet, client)
    assert t.parse_topic(t.fetch_topic(fleet, client)) == t.FetchTopic(fleet, client)
    assert t.parse_topic(t.down_topic(fleet, client)) == t.DownTopic(fleet, client)
    assert t.parse_topic(t.status_topic(fleet, client)) == t.StatusTopic(fleet, client)
    assert t.parse_topic(t.progress_topic(fleet)) == t.ProgressTopic(fleet)
    assert t.observer_filters(fleet) == (
        f"fstq/v1/{fleet}/round",
        f"fstq/v1/{fleet}/global/manifest",
        f"fstq/v1/{fleet}/progress",
        f"fstq/v1/{fleet}/status/+",
    )


@given(bad=bad_ids, good=ids)
def test_invalid_ids_are_rejected_by_every_builder(bad: str, good: str) -> None:
    with pytest.raises(TopicError):
        t.round_topic(bad)
    with pytest.raises(TopicError):
        t.upload_topic(good, bad, 1)
    with pytest.raises(TopicError):
        t.upload_topic(bad, good, 1)
    with pytest.raises(TopicError):
        t.ack_topic(good, bad)
    with pytest.raises(TopicError):
        t.status_topic(good, bad)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev+1", "dev#", "$SYS", "x" * 65, "é"])
def test_wildcards_slashes_and_odd_characters_are_not_ids(bad: str) -> None:
    with pytest.raises(TopicError) as info:
        t.validate_id(bad)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize("bad_round", [-1, 2**63, True, 1.0, "3"])
def test_round_must_be_a_non_negative_int(bad_round: object) -> None:
    with pytest.raises(TopicError):
        t.UploadTopic("f", "c", bad_round)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fstq/v1",
        "fstq/v2/f/round",
        "fstq/v1/f/round/extra",
        "fstq/v1/f/up/c",
        "fstq/v1/f/up/c/01",
        "fstq/v1/f/up/c/-1",
        "fstq/v1/f/up/c/1/2",
        "fstq/v1/f/up/+/1",
        "fstq/v1/+/round",
        "fstq/v1/f/global/other",
        "fstq/v1/f/ack",
        "fstq/v1/f/ack/a/b",
        "fstq/v1/f/unknown/c",
        "other/v1/f/round",
        "fstq/v1/f/up/c/99999999999999999999",
    ],
)
def test_malformed_topics_are_rejected(topic: str) -> None:
    with pytest.raises(TopicError):
        t.parse_topic(topic)
    assert all(t.topic_as(topic, kind) is None for kind in FAMILIES)


def test_topic_as_answers_only_for_its_own_family() -> None:
    up = t.upload_topic("f", "dev", 3)
    assert t.topic_as(up, t.UploadTopic) == t.UploadTopic("f", "dev", 3)
    assert t.topic_as(up, t.StatusTopic) is None
    assert t.topic_as(t.status_topic("f", "dev"), t.UploadTopic) is None
    assert t.topic_as(t.round_topic("f"), t.RoundTopic) == t.RoundTopic("f")
    assert t.topic_as(t.round_topic("f"), t.ProgressTopic) is None


def test_filters_match_exactly_their_family() -> None:
    # Arrange
    up = t.upload_topic("f1", "dev-1", 7)
    # Act / Assert
    assert t.upload_filter("f1") == "fstq/v1/f1/up/+/+"
    assert t.topic_matches(t.upload_filter("f1"), up)
    assert not t.topic_matches(t.upload_filter("f2"), up)
    assert not t.topic_matches(t.fetch_filter("f1"), up)
    assert t.aggregator_filters("f1") == (
        "fstq/v1/f1/up/+/+",
        "fstq/v1/f1/fetch/+",
        "fstq/v1/f1/status/+",
    )
    assert t.device_filters("f1", "d") == (
        "fstq/v1/f1/round",
        "fstq/v1/f1/global/manifest",
        "fstq/v1/f1/ack/d",
        "fstq/v1/f1/down/d",
    )
    assert t.topic_matches(t.status_filter("f1"), t.status_topic("f1", "d"))
    assert t.topic_matches("fstq/v1/f1/ack/+", t.ack_topic("f1", "d"))
    assert t.topic_matches("fstq/v1/f1/down/+", t.down_topic("f1", "d"))


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/b", "a/b/c", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$share/g/a/+", "a/b", True),
    ],
)
def test_topic_matches_follows_mqtt_rules(topic_filter: str, topic: str, expected: bool) -> None:
    assert t.topic_matches(topic_filter, topic) is expected


def test_client_segment_position_supports_acl_patterns() -> None:
    # The client id is always segment 4, so `pattern write fstq/v1/+/up/%u/+` works.
    for topic in (
        t.upload_topic("f", "dev", 3),
        t.fetch_topic("f", "dev"),
        t.status_topic("f", "dev"),
        t.ack_topic("f", "dev"),
        t.down_topic("f", "dev"),
    ):
        assert topic.split("/")[4] == "dev"
