"""Assembling one payload: framing, byte report, budget check and error-feedback residual.

The encoder side of :mod:`fstq.decoding`. A compressor opens a payload with the tensor table
(:func:`start_payload`), writes one section per tensor (:func:`encode_sparse` writes them for the
sparse methods), and :func:`finish_payload` closes it with the CRC, checks that every byte is
accounted and that the budget holds, and derives the new residual from what the decoder will
return.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from fstq.accounting import ByteReport, PartCounter
from fstq.container import CRC_BYTES, METHOD_NAMES, ByteWriter, Method, write_table
from fstq.conversion import UpdateArrays, to_tensor
from fstq.errors import BudgetError
from fstq.sparse_codec import SparseBlocks, encode_section, write_blocks
from fstq.sparse_plan import FSTQ_WIDTHS, TOPK_WIDTHS, PayloadPlan

__all__ = ["CompressedUpdate", "encode_sparse", "finish_payload", "start_payload"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CompressedUpdate:
    """One encoded update: payload bytes, their accounting, and the new EF residual."""

    method: str
    payload: bytes
    report: ByteReport
    residual: dict[str, torch.Tensor] | None  # float32; None when error feedback is off


def start_payload(method: Method, update: UpdateArrays) -> tuple[ByteWriter, PartCounter]:
    """A payload holding the tensor table of ``update``, and its byte tally."""
    out = ByteWriter()
    parts = PartCounter(n_coords=update.n_coords)
    parts.header += write_table(out, method, update.specs)
    return out, parts


def finish_payload(
    method: Method,
    out: ByteWriter,
    parts: PartCounter,
    update: UpdateArrays,
    decoded: list[F32] | None,
    budget_bytes: int | None,
) -> CompressedUpdate:
    """Close the payload; ``decoded`` (the decoder's flat values) gives the residual, if any."""
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


def encode_sparse(
    method: Method,
    update: UpdateArrays,
    plans: PayloadPlan,
    *,
    keep_decoded: bool,
    budget_bytes: int | None,
) -> CompressedUpdate:
    """The whole payload of an FSTQ or Top-k update from its section plans (FSTQ's INT codes
    are already in its plans)."""
    out, parts = start_payload(method, update)
    decoded: list[F32] = []
    tagged = method is Method.FSTQ
    widths = FSTQ_WIDTHS if tagged else TOPK_WIDTHS
    blocks = SparseBlocks.new() if tagged else None
    for t, x in enumerate(update.values):
        p = plans.section(t)
        vals = encode_section(out, parts, p, blocks, keep_decoded=keep_decoded)
        if vals is not None:
            dense = np.zeros(x.size, dtype=np.float32)
            dense[p.support] = vals
            decoded.append(dense)
        parts.n_sent += p.k
        parts.bits[0] += p.n - p.k
        for width, count in zip(widths[1:], p.counts[-(len(widths) - 1) :], strict=True):
            parts.bits[width] += count
    if blocks is not None:
        write_blocks(out, parts, blocks)
    return finish_payload(
        method, out, parts, update, decoded if keep_decoded else None, budget_bytes
    )
