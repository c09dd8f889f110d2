"""Compressor objects for every uplink method (and ``decompress``, from :mod:`fstq.decoding`).

Every method emits one self-describing payload (see :mod:`fstq.container`) whose bytes are fully
accounted in a :class:`~fstq.accounting.ByteReport`. ``decompress(payload)`` reads any of them.
Methods that do not use an argument (``fisher`` for the baselines) ignore it.
Nothing here mutates its inputs or does I/O; randomness comes from the ``rng`` argument (a fixed
``default_rng(0)`` when omitted, so results are reproducible but correlated across calls: pass a
generator in training loops).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from fstq.accounting import ByteReport, PartCounter
from fstq.allocation import (
    FSTQ_VALUE_BITS,
    TAG_BITS,
    FstqPrices,
    LevelCosts,
    MagnitudePrices,
    Policy,
    ScaleRule,
    choose_scales,
    index_bits_estimate,
    percentile_levels,
    policy_weights,
    rescale_weights,
    sample_update,
)
from fstq.budget import plans_at, plans_within, sample_target
from fstq.config import FstqConfig
from fstq.container import (
    CRC_BYTES,
    METHOD_NAMES,
    ByteWriter,
    DecodeLimits,
    Method,
    TensorSpec,
    table_size,
    write_table,
)
from fstq.conversion import UpdateArrays, prepare_update, to_tensor
from fstq.decoding import decompress
from fstq.dense_codec import encode_dense_section
from fstq.errors import BudgetError, ConfigError
from fstq.ladder import price_histogram
from fstq.qsgd import (
    encode_qsgd_section,
    write_qsgd_params,
)
from fstq.quantize import Rounding
from fstq.sparse_codec import (
    FSTQ_WIDTHS,
    TOPK_WIDTHS,
    SparsePlan,
    encode_section,
    plan,
)

__all__ = [
    "ByteReport",
    "CompressedUpdate",
    "Compressor",
    "DecodeLimits",
    "DenseCompressor",
    "FstqCompressor",
    "QsgdCompressor",
    "TopkCompressor",
    "decompress",
    "make_compressor",
]

F32 = npt.NDArray[np.float32]
_METHOD_IDS = {name: method for method, name in METHOD_NAMES.items()}


@dataclass(frozen=True)
class CompressedUpdate:
    """One encoded update: payload bytes, their accounting, and the new EF residual."""

    method: str
    payload: bytes
    report: ByteReport
    residual: dict[str, torch.Tensor] | None  # float32; None when error feedback is off


class Compressor(Protocol):
    """What every uplink method implements."""

    method: str

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        fisher: Mapping[str, torch.Tensor] | None = None,
        budget_bytes: int | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate: ...


# --------------------------------------------------------------------------------------------
# shared plumbing


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(0)


def _fixed_bytes(specs: list[TensorSpec], params: int = 0) -> int:
    return table_size(specs) + params + CRC_BYTES


def _start(method: Method, update: UpdateArrays) -> tuple[ByteWriter, PartCounter]:
    out = ByteWriter()
    parts = PartCounter(n_coords=update.n_coords)
    parts.header += write_table(out, method, update.specs)
    return out, parts


def _finish(
    method: Method,
    out: ByteWriter,
    parts: PartCounter,
    update: UpdateArrays,
    decoded: list[F32] | None,
    budget_bytes: int | None,
) -> CompressedUpdate:
    payload = out.finish()
    parts.header += CRC_BYTES
    report = parts.report()
    if report.total != len(payload):
        raise AssertionError(f"accounted {report.total} bytes, payload has {len(payload)}")
    if budget_bytes is not None and len(payload) > budget_bytes:
        raise BudgetError(
            f"{METHOD_NAMES[method]} needs {len(payload)} bytes, budget is {budget_bytes}"
        )
    residual = None
    if decoded is not None:
        residual = {}
        for spec, x, d in zip(update.specs, update.values, decoded, strict=True):
            # Round through the output dtype so decompress(payload) + residual == x exactly
            # up to float32 rounding, whatever the tensor's dtype.
            seen = to_tensor(d, spec).to(torch.float32).reshape(-1).numpy()
            residual[spec.name] = torch.from_numpy(x - seen).reshape(spec.shape)
    return CompressedUpdate(METHOD_NAMES[method], payload, report, residual)


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

    def __init__(self, dtype: Literal["fp32", "fp16"]) -> None:
        if dtype not in ("fp32", "fp16"):
            raise ConfigError(f"dense dtype must be 'fp32' or 'fp16', got {dtype!r}")
        self.method = f"dense_{dtype}"
        self._id = _METHOD_IDS[self.method]
        self._width = 32 if dtype == "fp32" else 16

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        fisher: Mapping[str, torch.Tensor] | None = None,
        budget_bytes: int | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate:
        _no_residual(self.method, residual)
        _check_budget(budget_bytes)
        update = prepare_update(delta)
        out, parts = _start(self._id, update)
        for x in update.values:
            encode_dense_section(out, parts, x, self._width)
        parts.n_sent = update.n_coords
        parts.bits[self._width] = update.n_coords
        return _finish(self._id, out, parts, update, None, budget_bytes)


class QsgdCompressor:
    """QSGD with ``bits``-bit codes: ``s = 2**(bits-1) - 1`` levels, per-bucket fp32 L2 norms.

    ``bits`` in 2..8 (2 = ternary sign*{0,1}, 4 = s=7, 8 = s=127). A budget is only checked.
    """

    method = "qsgd"

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
        fisher: Mapping[str, torch.Tensor] | None = None,
        budget_bytes: int | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate:
        _no_residual(self.method, residual)
        _check_budget(budget_bytes)
        update = prepare_update(delta)
        gen = _rng(rng)
        out, parts = _start(Method.QSGD, update)
        parts.header += write_qsgd_params(out, self.bits, self.bucket_size)
        for x in update.values:
            encode_qsgd_section(out, parts, x, self.bits, self.bucket_size, gen)
        parts.n_sent = update.n_coords
        parts.bits[self.bits] = update.n_coords
        return _finish(Method.QSGD, out, parts, update, None, budget_bytes)


# --------------------------------------------------------------------------------------------
# sparse methods


def _encode_sparse(
    method: Method,
    update: UpdateArrays,
    plans: list[SparsePlan],
    rng: np.random.Generator,
    *,
    rounding: Rounding = "nearest",
    scales: list[tuple[float, float]] | None = None,
    keep_decoded: bool,
    budget_bytes: int | None,
) -> CompressedUpdate:
    out, parts = _start(method, update)
    decoded: list[F32] = []
    widths = FSTQ_WIDTHS if method is Method.FSTQ else TOPK_WIDTHS
    for i, (x, p) in enumerate(zip(update.values, plans, strict=True)):
        vals = encode_section(
            out, parts, x, p, rounding, rng, None if scales is None else scales[i]
        )
        if keep_decoded:
            dense = np.zeros(x.size, dtype=np.float32)
            dense[p.support] = vals
            decoded.append(dense)
        parts.n_sent += p.k
        parts.bits[0] += p.n - p.k
        for width, count in zip(widths[1:], p.counts[-(len(widths) - 1) :], strict=True):
            parts.bits[width] += count
    return _finish(method, out, parts, update, decoded if keep_decoded else None, budget_bytes)


def _min_bytes(specs: list[TensorSpec], budget_bytes: int) -> int:
    """Bytes left for sections; BudgetError if even empty sections do not fit."""
    fixed = _fixed_bytes(specs)
    if budget_bytes < fixed + len(specs):  # an empty section is a one-byte head
        raise BudgetError(f"budget {budget_bytes} B is below the minimal {fixed + len(specs)} B")
    return budget_bytes - fixed


class FstqCompressor:
    """Fed-FSTQ: Fisher-weighted mixed precision {0, 2, 4, 16} bits (see fstq/README.md).

    ``policy`` picks the importance the allocation uses: ``"fisher"`` (the method),
    ``"uniform"`` (ignores the Fisher: magnitude-based) or ``"random"`` (random support at the
    same budget): the paper's Table VII ablations. ``scale_rule`` picks the INT scales
    (:mod:`fstq.allocation`): ``"search"`` (default), ``"absmax"`` (decision 7 literally) or
    ``"group"`` (paper literally).
    """

    method = "fstq"

    def __init__(
        self,
        config: FstqConfig = FstqConfig(),  # noqa: B008 (frozen dataclass)
        *,
        policy: Policy = "fisher",
        scale_rule: ScaleRule = "search",
    ) -> None:
        if policy not in ("fisher", "uniform", "random"):
            raise ConfigError(f"policy must be fisher, uniform or random, got {policy!r}")
        if scale_rule not in ("search", "absmax", "group"):
            raise ConfigError(f"scale_rule must be search, absmax or group, got {scale_rule!r}")
        self.config = config
        self.policy: Policy = policy
        self.scale_rule: ScaleRule = scale_rule

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        fisher: Mapping[str, torch.Tensor] | None = None,
        budget_bytes: int | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate:
        cfg = self.config
        _check_budget(budget_bytes)
        if not cfg.error_feedback:
            _no_residual("fstq with error_feedback=False", residual)
        if cfg.allocation == "budget" and budget_bytes is None:
            raise ConfigError("fstq allocation='budget' needs budget_bytes")
        update = prepare_update(delta, residual=residual, fisher=fisher)
        gen = _rng(rng)
        fishers: list[F32 | None] = (
            list(update.fisher) if update.fisher is not None else [None] * len(update.values)
        )
        weights = rescale_weights(
            [
                policy_weights(x, f, self.policy, gen)
                for x, f in zip(update.values, fishers, strict=True)
            ]
        )
        if cfg.allocation == "percentile":
            importance = [
                np.square(x) if w is None else np.square(x) * w
                for x, w in zip(update.values, weights, strict=True)
            ]
            levels = percentile_levels(importance, cfg.percentiles)
            plans = [plan(lv, tagged=True) for lv in levels]
            scales = None
        else:
            assert budget_bytes is not None
            plans, scales = self._budget_plans(
                update, weights, _min_bytes(update.specs, budget_bytes)
            )
        return _encode_sparse(
            Method.FSTQ,
            update,
            plans,
            gen,
            rounding=cfg.rounding,
            scales=None if self.scale_rule == "absmax" else scales,
            keep_decoded=cfg.error_feedback,
            budget_bytes=budget_bytes,
        )

    def _budget_plans(
        self, update: UpdateArrays, weights: list[F32 | None], avail: int
    ) -> tuple[list[SparsePlan], list[tuple[float, float]]]:
        xs = update.values
        rounding = self.config.rounding
        bits_per_coord = 8.0 * avail / max(update.n_coords, 1)
        # Index cost estimate at the density the budget implies if most sends were INT4 + tag.
        costs = LevelCosts(FSTQ_VALUE_BITS, TAG_BITS, index_bits_estimate(bits_per_coord, 6.0))
        # First target: section heads (1 B) and INT scales (<= 8 B) are outside the model.
        target = 8.0 * (avail - 9 * len(xs))
        sample = sample_update(xs, weights)
        scales = choose_scales(sample, costs, rounding, target, self.scale_rule)
        steps = costs.step_bits()
        # Where the budget lands is estimated on the sample, then fitted on the full update.
        sample_src = FstqPrices(sample.xs, sample.weights, scales, costs, rounding)
        target, counts = sample_target(
            sample_src, sample.strides, sample.sizes, steps, avail, target, tagged=True
        )
        src = FstqPrices(xs, weights, scales, costs, rounding)
        return plans_within(src, counts, steps, avail, target, tagged=True), scales


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
        fisher: Mapping[str, torch.Tensor] | None = None,
        budget_bytes: int | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
        rng: np.random.Generator | None = None,
    ) -> CompressedUpdate:
        _check_budget(budget_bytes)
        if not self.error_feedback:
            _no_residual("topk with error_feedback=False", residual)
        if budget_bytes is None and self.fraction is None:
            raise ConfigError("topk needs budget_bytes or a fraction")
        update = prepare_update(delta, residual=residual)
        src = MagnitudePrices(update.values)
        if budget_bytes is not None:
            avail = _min_bytes(update.specs, budget_bytes)
            bits_per_coord = 8.0 * avail / max(update.n_coords, 1)
            step = 16.0 + index_bits_estimate(bits_per_coord, 16.0)
            target = 8.0 * (avail - len(update.specs))
            plans = plans_within(src, price_histogram(src), (step,), avail, target, tagged=False)
        else:
            assert self.fraction is not None
            k = round(self.fraction * update.n_coords)
            plans = plans_at(src, price_histogram(src), (1.0,), float(k), tagged=False)
        return _encode_sparse(
            Method.TOPK,
            update,
            plans,
            _rng(rng),
            keep_decoded=self.error_feedback,
            budget_bytes=budget_bytes,
        )


# --------------------------------------------------------------------------------------------
# factory


def make_compressor(method: str, **options: Any) -> Compressor:
    """Build a compressor by method name (for CLIs): fstq, dense_fp32, dense_fp16, qsgd, topk.

    ``fstq`` takes ``config`` (an FstqConfig) or FstqConfig field names, plus ``policy`` and
    ``scale_rule``; the others take their constructor's keyword arguments.
    """
    if method == "fstq":
        policy = options.pop("policy", "fisher")
        scale_rule = options.pop("scale_rule", "search")
        config = options.pop("config", None)
        if config is None:
            config = FstqConfig.from_dict(options) if options else FstqConfig()
        elif options:
            raise ConfigError(
                f"fstq: pass either config or field names, not both: {sorted(options)}"
            )
        return FstqCompressor(config, policy=policy, scale_rule=scale_rule)
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
