"""Empirical entropy of the symbol streams of a payload: how close the packing is to its bound.

For each tensor, each stream is measured by its zeroth-order empirical entropy (an i.i.d.
model fitted to that tensor's stream, no context modelling):

* support: ``n * H(k/n)`` (a Bernoulli mask of the sent coordinates; 0 for dense methods);
* tags: ``k * H(tag frequencies)``;
* INT2/INT4 and QSGD codes: ``count * H(code frequencies)`` per bit-width;
* fp16/fp32 values, INT scales and QSGD norms: raw, at their own width.

Framing (magic, table, section heads, CRC) is not a symbol stream: compare
``report.total`` with ``report.header + entropy.total``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fstq.container import DecodeLimits, Method, open_payload
from fstq.qsgd import parse_qsgd_section, read_qsgd_params
from fstq.sparse_codec import parse_sections

__all__ = ["StreamEntropy", "payload_entropy"]


@dataclass(frozen=True)
class StreamEntropy:
    """Entropy bounds, in bytes, of the streams a :class:`~fstq.accounting.ByteReport` counts."""

    indices: float
    tags: float
    values: float
    scales: float

    @property
    def total(self) -> float:
        return self.indices + self.tags + self.values + self.scales


def _bernoulli_bits(k: int, n: int) -> float:
    if k == 0 or k == n:
        return 0.0
    p = k / n
    return float(-n * (p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def _symbols_bits(codes: npt.NDArray[np.uint8]) -> float:
    if codes.size == 0:
        return 0.0
    counts = np.bincount(codes).astype(np.float64)
    p = counts[counts > 0] / codes.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def payload_entropy(payload: bytes, limits: DecodeLimits = DecodeLimits()) -> StreamEntropy:  # noqa: B008
    """Entropy of the symbol streams of a valid payload (see the module docstring)."""
    method, specs, reader = open_payload(payload, limits)
    bits = [0.0, 0.0, 0.0, 0.0]  # indices, tags, values, scales
    if method in (Method.DENSE_FP32, Method.DENSE_FP16):
        width = 4 if method is Method.DENSE_FP32 else 2
        bits[2] = 8.0 * width * sum(s.numel for s in specs)
        return StreamEntropy(*(b / 8 for b in bits))
    if method is Method.QSGD:
        qsgd = read_qsgd_params(reader, limits.max_bucket_size)
        for spec in specs:
            norms, codes = parse_qsgd_section(reader, spec.numel, *qsgd, spec.name)
            bits[2] += _symbols_bits(codes)
            bits[3] += 32.0 * norms.size
        reader.expect_end()
        return StreamEntropy(*(b / 8 for b in bits))
    for sec in parse_sections(reader, specs, tagged=method is Method.FSTQ):
        bits[0] += _bernoulli_bits(int(sec.support.size), sec.n)
        bits[2] += 16.0 * sec.fp16.size + _symbols_bits(sec.int2) + _symbols_bits(sec.int4)
        if sec.tags is not None:
            bits[1] += _symbols_bits(sec.tags)
            bits[3] += 32.0 * ((sec.int2.size > 0) + (sec.int4.size > 0))
    reader.expect_end()
    return StreamEntropy(*(b / 8 for b in bits))
