"""The single decoder entry point: any method's payload back to dense named tensors.

The decoder faces the network. Declared counts and shapes are checked against
:class:`~fstq.container.DecodeLimits` before anything is allocated, every section length
against the bytes left, and every symbol against its range; the only exception that leaves
:func:`decompress` is :class:`~fstq.errors.DecodeError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from fstq.container import ByteReader, DecodeLimits, Method, TensorSpec, open_payload
from fstq.conversion import to_tensor
from fstq.dense_codec import DENSE_WIDTHS, decode_dense_section
from fstq.errors import DecodeError
from fstq.qsgd import decode_qsgd_section, read_qsgd_params
from fstq.sparse_codec import parse_sections

__all__ = ["DecodeLimits", "decompress"]

F32 = npt.NDArray[np.float32]
_NARROW = (torch.float16, torch.bfloat16)


def decompress(payload: bytes, limits: DecodeLimits = DecodeLimits()) -> dict[str, torch.Tensor]:  # noqa: B008
    """Decode any method's payload into dense tensors with the original names, shapes, dtypes.

    Raises only :class:`~fstq.errors.DecodeError` on malformed, truncated, hostile or
    over-limit input.
    """
    try:
        return _decompress(payload, limits)
    except DecodeError:
        raise
    except Exception as exc:  # defence in depth: the causes found by fuzzing are fixed
        raise DecodeError(f"malformed payload ({type(exc).__name__}: {exc})") from exc


def _decompress(payload: bytes, limits: DecodeLimits) -> dict[str, torch.Tensor]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise DecodeError(f"payload must be bytes, got {type(payload).__name__}")
    method, specs, reader = open_payload(bytes(payload), limits)
    out = {}
    for spec, flat in zip(specs, _flat_values(reader, method, specs, limits), strict=True):
        tensor = to_tensor(flat, spec)
        # Valid sections can still describe values the dtype cannot hold (a huge scale, a
        # float32 beyond the fp16 range): the encoder never emits them, so refuse them.
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(flat.sum())) or bool(np.isfinite(flat).all())
        if not finite or (spec.dtype in _NARROW and not bool(torch.isfinite(tensor).all())):
            raise DecodeError(f"{spec.name}: decoded values overflow {spec.dtype}")
        out[spec.name] = tensor
    reader.expect_end()
    return out


def _flat_values(
    reader: ByteReader, method: Method, specs: list[TensorSpec], limits: DecodeLimits
) -> list[F32]:
    """Every tensor's flat float32 values, in table order."""
    if method in DENSE_WIDTHS:
        width = DENSE_WIDTHS[method]
        return [decode_dense_section(reader, s.numel, width, s.name) for s in specs]
    if method is Method.QSGD:
        bits, bucket = read_qsgd_params(reader, limits.max_bucket_size)
        return [decode_qsgd_section(reader, s.numel, bits, bucket, s.name) for s in specs]
    # Sparse sections are all parsed first: FSTQ's coded streams follow the last one.
    return [s.dense() for s in parse_sections(reader, specs, tagged=method is Method.FSTQ)]
