from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from workload.adapters import (
    AdapterFormatError,
    adapter_from_bytes,
    adapter_to_bytes,
    load_peft_dir,
    save_peft_dir,
)
from workload.models import (
    SMOLLM2,
    SMOLLM2_HUB_ID,
    TINY,
    LoraSpec,
    ModelLoadError,
    base_model_reference,
    load_base_model,
    make_peft_model,
    model_dir,
)


def test_bytes_round_trip_and_determinism() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4)}
    data = adapter_to_bytes(state)
    assert data == adapter_to_bytes(state)
    back = adapter_from_bytes(data)
    assert all(torch.equal(back[k], state[k]) for k in state)
    half = adapter_from_bytes(adapter_to_bytes(state, dtype=torch.float16))
    torch.testing.assert_close(
        half["a.lora_A.weight"], state["a.lora_A.weight"], rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 7, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"]
)
def test_garbage_is_a_format_error(data: bytes) -> None:
    with pytest.raises(AdapterFormatError):
        adapter_from_bytes(data)


def test_peft_directory_loads_with_stock_peft(tmp_path: Path) -> None:
    spec = LoraSpec(r=4, alpha=8)
    base, _ = load_base_model(TINY)
    model: Any = make_peft_model(base, spec, seed=1)
    state = {k: v + 0.5 for k, v in get_peft_model_state_dict(model).items()}
    save_peft_dir(
        tmp_path / "global", state, spec, base_model=str(model_dir(TINY)), metadata={"round": "3"}
    )
    assert load_peft_dir(tmp_path / "global").keys() == state.keys()
    fresh, _ = load_base_model(TINY)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "global"))
    got = get_peft_model_state_dict(loaded)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_adapter_configs_name_a_base_that_loads_the_usual_way(tmp_path: Path) -> None:
    """SmolLM2 by its public id; a model directory by its absolute path; tiny by a saved copy."""
    assert base_model_reference(SMOLLM2) == SMOLLM2_HUB_ID
    local = model_dir(SMOLLM2)
    assert base_model_reference(local) == str(local.resolve())
    with pytest.raises(ModelLoadError):
        base_model_reference(tmp_path)  # not a model directory
    # The default cache, like the services (a private one would convert SmolLM2 again).
    tiny_dir = Path(base_model_reference(TINY))
    assert (tiny_dir / "config.json").is_file() and tiny_dir.is_absolute()
    assert base_model_reference(TINY) == str(tiny_dir)  # saved once, found again
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True)
    built, _ = load_base_model(TINY)
    assert saved.state_dict().keys() == built.state_dict().keys()
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in built.state_dict().items())
