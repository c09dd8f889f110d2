"""The LoRA settings a global manifest carries: written by the aggregator, read by devices."""

from __future__ import annotations

import pytest

from workload.models import LoraMetadataError, LoraSpec

SPEC = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


def test_metadata_keeps_its_wire_keys_and_reads_back() -> None:
    meta = SPEC.to_metadata("tiny")
    # Golden manifests and deployed devices depend on these keys, in this order.
    assert list(meta.items()) == [
        ("lora_r", 4),
        ("lora_alpha", 8),
        ("lora_targets", "q_proj,v_proj"),
        ("base_model", "tiny"),
    ]
    assert LoraSpec.from_metadata(meta) == SPEC


def test_reading_tolerates_spaces_and_a_float_alpha() -> None:
    meta = {"lora_r": 4, "lora_alpha": 8.0, "lora_targets": " q_proj , v_proj ,"}
    assert LoraSpec.from_metadata(meta) == SPEC


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora_r", None),
        ("lora_r", 0),
        ("lora_r", True),
        ("lora_r", "4"),
        ("lora_alpha", None),
        ("lora_alpha", -1),
        ("lora_alpha", False),
        ("lora_targets", None),
        ("lora_targets", 3),
        ("lora_targets", " , "),
    ],
)
def test_a_bad_value_is_a_typed_error_naming_its_key(key: str, value: object) -> None:
    meta: dict[str, object] = {**SPEC.to_metadata("tiny"), key: value}
    if value is None:
        del meta[key]
    with pytest.raises(LoraMetadataError, match=key) as caught:
        LoraSpec.from_metadata(meta)
    assert caught.value.key == key
    assert isinstance(caught.value, ValueError)  # what the agent's round catches
