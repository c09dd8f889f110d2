"""The uplink compressors, one class per method, the interfaces they share, and the factory.

Every method emits one self-describing payload (see :mod:`fstq.container`) whose bytes are fully
accounted in a :class:`~fstq.accounting.ByteReport`; ``decompress(payload)`` (from
:mod:`fstq.decoding`) reads any of them. :class:`Compressor` is what every method honours; the
round's other inputs are capabilities of some methods only: an error-feedback residual
(:class:`ErrorFeedbackCompressor`: fstq, topk) and the coordinate Fisher
(:class:`FisherCompressor`: fstq). :func:`compress_round` hands one round's inputs to whichever
method a device runs. FSTQ's plans come from :mod:`fstq.budget` (the fit to a byte budget, on
the model of :mod:`fstq.allocation`) or :mod:`fstq.percentile`; Top-k's from :mod:`fstq.budget`.

Nothing here mutates its inputs or does I/O; randomness comes from the ``rng`` argument (a fixed
``default_rng(0)`` when omitted, so results are reproducible but correlated across calls: pass a
generator in training loops).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, overload

import numpy as np
import torch

from fstq.accounting import ByteReport
from fstq.allocation import Policy, ScaleRule, allocation_weights, check_policy
from fstq.budget import fstq_budget_plans, section_budget, topk_budget_plans, topk_count_plans
from fstq.config import FstqConfig
from fstq.container import METHOD_NAMES, DecodeLimits, Method
from fstq.conversion import prepare_update
from fstq.decoding import decompress
from fstq.dense_codec import DENSE_WIDTHS, encode_dense_section
from fstq.encoding import CompressedUpdate, encode_sparse, finish_payload, start_payload
from fstq.errors import ConfigError
from fstq.percentile import percentile_plans
from fstq.qsgd import encode_qsgd_section, write_qsgd_params
from fstq.sparse_plan import Coding

__all__ = [
    "ByteReport",
    "CompressedUpdate",
    "Compressor",
    "DecodeLimits",
    "DenseCompressor",
    "ErrorFeedbackCompressor",
    "FisherCompressor",
    "FstqCompressor",
    "QsgdCompressor",
    "TopkCompressor",
    "compress_round",
    "decompress",
    "make_compressor",
]

_METHOD_IDS = {name: method for method, name in METHOD_NAMES.items()}


class Compressor(Protocol):
    """What every uplink method honours: a delta in, one payload of at most ``budget_bytes``.

    Methods that cannot adapt their size (dense, QSGD, fstq's percentile bands, Top-k by
    fraction) only check a given budget: :class:`~fstq.errors.BudgetError` when it is exceeded.
    """

    @property
    def method(self) -> str:
        """The method name on the wire (:data:`~fstq.container.METHOD_NAMES`)."""
        ...

    @property
    def error_feedback(self) -> bool:
        """Whether ``compress`` takes a residual and returns the new one (then it is an
        :class:`ErrorFeedbackCompressor`)."""
        ...

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate: ...


class ErrorFeedbackCompressor(Compressor, Protocol):
    """fstq and topk: ``compress`` sends ``delta + residual`` and returns what it left out.

    ``residual`` must be None unless :attr:`error_feedback` is on (ConfigError).
    """

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> CompressedUpdate: ...


class FisherCompressor(ErrorFeedbackCompressor, Protocol):
    """fstq: ``compress`` also takes the round's coordinate Fisher to weigh the allocation."""

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
        fisher: Mapping[str, torch.Tensor] | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> CompressedUpdate: ...


# --------------------------------------------------------------------------------------------
# shared plumbing


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(0)


def _no_residual(method: str, residual: Mapping[str, torch.Tensor] | None) -> None:
    if residual is not None:
        raise ConfigError(f"{method} runs without error feedback: pass residual=None")


def _check_budget(budget_bytes: int | None) -> None:
    if budget_bytes is not None and budget_bytes < 0:
        raise ConfigError(f"budget_bytes must be >= 0, got {budget_bytes}")


# --------------------------------------------------------------------------------------------
# dense and QSGD baselines


class DenseCompressor:
    """Raw fp32 or fp16 values (fp16 clamps to the finite half range). A budget is only checked."""

    error_feedback = False

    def __init__(self, dtype: Literal["fp32", "fp16"]) -> None:
        if dtype not in ("fp32", "fp16"):
            raise ConfigError(f"dense dtype must be 'fp32' or 'fp16', got {dtype!r}")
        self.method = f"dense_{dtype}"
        self._id = _METHOD_IDS[self.method]
        self._width = DENSE_WIDTHS[self._id]

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate:
        """Every coordinate at the dense width; ``rng`` is unused (rounding is to nearest)."""
        _check_budget(budget_bytes)
        update = prepare_update(delta)
        out, parts = start_payload(self._id, update)
        for x in update.values:
            encode_dense_section(out, parts, x, self._width)
        parts.n_sent = update.n_coords
        parts.bits[self._width] = update.n_coords
        return finish_payload(self._id, out, parts, update, None, budget_bytes)


class QsgdCompressor:
    """QSGD with ``bits``-bit codes: ``s = 2**(bits-1) - 1`` levels, per-bucket fp32 L2 norms.

    ``bits`` in 2..8 (2 = ternary sign*{0,1}, 4 = s=7, 8 = s=127). A budget is only checked.
    """

    method = "qsgd"
    error_feedback = False

    def __init__(self, bits: int = 4, bucket_size: int = 512) -> None:
        if not 2 <= bits <= 8:
            raise ConfigError(f"qsgd bits must be in 2..8, got {bits}")
        if not 1 <= bucket_size <= DecodeLimits().max_bucket_size:
            raise ConfigError(f"qsgd bucket_size must be in 1..2**24, got {bucket_size}")
        self.bits = bits
        self.bucket_size = bucket_size

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate:
        """Every coordinate stochastically rounded to its bucket's levels (draws from ``rng``)."""
        _check_budget(budget_bytes)
        update = prepare_update(delta)
        gen = _rng(rng)
        out, parts = start_payload(Method.QSGD, update)
        parts.header += write_qsgd_params(out, self.bits, self.bucket_size)
        for x in update.values:
            encode_qsgd_section(out, parts, x, self.bits, self.bucket_size, gen)
        parts.n_sent = update.n_coords
        parts.bits[self.bits] = update.n_coords
        return finish_payload(Method.QSGD, out, parts, update, None, budget_bytes)


# --------------------------------------------------------------------------------------------
# sparse methods


class FstqCompressor:
    """Fed-FSTQ: Fisher-weighted mixed precision {0, 2, 4, 16} bits (see fstq/README.md).

    ``policy`` picks the importance the allocation uses: ``"fisher"`` (the method),
    ``"uniform"`` (ignores the Fisher: magnitude-based) or ``"random"`` (random support at the
    same budget): the paper's Table VII ablations. ``scale_rule`` picks the INT scales
    (:mod:`fstq.allocation`): ``"search"`` (default), ``"absmax"`` (decision 7 literally) or
    ``"group"`` (paper literally). ``entropy_coding=False`` sends every tag and INT code at its
    fixed width, as format 1 did (for comparisons; the decoder reads both choices).
    """

    method = "fstq"

    def __init__(
        self,
        config: FstqConfig = FstqConfig(),  # noqa: B008 (frozen dataclass)
        *,
        policy: Policy = "fisher",
        scale_rule: ScaleRule = "search",
        entropy_coding: bool = True,
    ) -> None:
        check_policy(policy, scale_rule)
        self.config = config
        self.policy: Policy = policy
        self.scale_rule: ScaleRule = scale_rule
        self.entropy_coding = bool(entropy_coding)

    @property
    def error_feedback(self) -> bool:
        return self.config.error_feedback

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
        fisher: Mapping[str, torch.Tensor] | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> CompressedUpdate:
        """Allocate bits by ``fisher``-weighted importance (None: all ones), then encode.

        ``budget_bytes`` is required with ``allocation="budget"``; ``residual`` needs
        ``error_feedback=True``.
        """
        cfg = self.config
        _check_budget(budget_bytes)
        if not cfg.error_feedback:
            _no_residual("fstq with error_feedback=False", residual)
        if cfg.allocation == "budget" and budget_bytes is None:
            raise ConfigError("fstq allocation='budget' needs budget_bytes")
        update = prepare_update(delta, residual=residual, fisher=fisher)
        gen = _rng(rng)
        weights = allocation_weights(update.values, update.fisher, self.policy, gen)
        coding = Coding(self.entropy_coding, cfg.rounding, gen)
        if cfg.allocation == "percentile":
            plans = percentile_plans(update.values, weights, cfg.percentiles, coding)
        else:
            assert budget_bytes is not None
            avail = section_budget(update.specs, budget_bytes, tagged=True)
            plans = fstq_budget_plans(update.values, weights, avail, coding, self.scale_rule)
        return encode_sparse(
            Method.FSTQ,
            update,
            plans,
            keep_decoded=cfg.error_feedback,
            budget_bytes=budget_bytes,
        )


class TopkCompressor:
    """Top-k by magnitude with fp16 values and the same index coder as FSTQ.

    ``k`` comes from ``budget_bytes`` when given (the exact size never exceeds it), else from
    ``fraction`` of all coordinates (a global top-k over the update). Values are fp16: the EF
    residual absorbs their rounding.
    """

    method = "topk"

    def __init__(self, fraction: float | None = None, error_feedback: bool = True) -> None:
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"topk fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.error_feedback = error_feedback

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        budget_bytes: int | None = None,
        rng: np.random.Generator | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> CompressedUpdate:
        """Send the largest magnitudes of ``delta + residual``; ``rng`` is unused."""
        _check_budget(budget_bytes)
        if not self.error_feedback:
            _no_residual("topk with error_feedback=False", residual)
        if budget_bytes is None and self.fraction is None:
            raise ConfigError("topk needs budget_bytes or a fraction")
        update = prepare_update(delta, residual=residual)
        coding = Coding()
        if budget_bytes is not None:
            avail = section_budget(update.specs, budget_bytes, tagged=False)
            plans = topk_budget_plans(update.values, avail, coding)
        else:
            assert self.fraction is not None
            plans = topk_count_plans(update.values, round(self.fraction * update.n_coords), coding)
        return encode_sparse(
            Method.TOPK,
            update,
            plans,
            keep_decoded=self.error_feedback,
            budget_bytes=budget_bytes,
        )


# --------------------------------------------------------------------------------------------
# a round's inputs, and the factory


def compress_round(
    compressor: Compressor,
    delta: Mapping[str, torch.Tensor],
    *,
    fisher: Mapping[str, torch.Tensor] | None = None,
    residual: Mapping[str, torch.Tensor] | None = None,
    budget_bytes: int | None = None,
    rng: np.random.Generator | None = None,
) -> CompressedUpdate:
    """Compress one round's ``delta`` with whichever method a device runs.

    ``fisher`` goes to the methods that weigh by it (fstq) and the others do without it;
    ``residual`` goes to the methods with error feedback, and is a ConfigError for the others.
    A caller that knows its method calls ``compress`` directly.
    """
    if isinstance(compressor, FstqCompressor):
        return compressor.compress(
            delta, budget_bytes=budget_bytes, rng=rng, fisher=fisher, residual=residual
        )
    if isinstance(compressor, TopkCompressor):
        return compressor.compress(delta, budget_bytes=budget_bytes, rng=rng, residual=residual)
    _no_residual(compressor.method, residual)
    return compressor.compress(delta, budget_bytes=budget_bytes, rng=rng)


@overload
def make_compressor(method: Literal["fstq"], **options: Any) -> FstqCompressor: ...
@overload
def make_compressor(method: Literal["topk"], **options: Any) -> TopkCompressor: ...
@overload
def make_compressor(method: str, **options: Any) -> Compressor: ...
def make_compressor(method: str, **options: Any) -> Compressor:
    """Build a compressor by method name (for CLIs): fstq, dense_fp32, dense_fp16, qsgd, topk.

    ``fstq`` takes ``config`` (an FstqConfig) or FstqConfig field names, plus ``policy``,
    ``scale_rule`` and ``entropy_coding``; the others take their constructor's keyword arguments.
    """
    if method == "fstq":
        policy = options.pop("policy", "fisher")
        scale_rule = options.pop("scale_rule", "search")
        entropy_coding = options.pop("entropy_coding", True)
        config = options.pop("config", None)
        if config is None:
            config = FstqConfig.from_dict(options) if options else FstqConfig()
        elif options:
            raise ConfigError(
                f"fstq: pass either config or field names, not both: {sorted(options)}"
            )
        return FstqCompressor(
            config, policy=policy, scale_rule=scale_rule, entropy_coding=entropy_coding
        )
    try:
        if method in ("dense_fp32", "dense_fp16"):
            return DenseCompressor(method.removeprefix("dense_"), **options)  # type: ignore[arg-type]
        if method == "qsgd":
            return QsgdCompressor(**options)
        if method == "topk":
            return TopkCompressor(**options)
    except TypeError as exc:
        raise ConfigError(f"{method}: bad options {sorted(options)}: {exc}") from exc
    raise ConfigError(f"unknown compression method {method!r}; known: {sorted(_METHOD_IDS)}")
