"""Each agent default is written once: the compression settings take the codec's defaults.

AgentSettings cannot import them (fstq loads torch, and a configuration error must not), so
this test holds the two equal.
"""

from __future__ import annotations

import inspect

from edge_agent.settings import CompressionSettings
from fstq import FstqConfig
from fstq.compressors import QsgdCompressor

#: CompressionSettings field -> the FstqConfig field it feeds.
FSTQ_FIELDS = ("token_keep_ratio", "allocation", "rounding", "error_feedback")


def test_compression_settings_default_to_the_fstq_config() -> None:
    settings, config = CompressionSettings(), FstqConfig()
    assert {f: getattr(settings, f) for f in FSTQ_FIELDS} == {
        f: getattr(config, f) for f in FSTQ_FIELDS
    }


def test_qsgd_bits_default_to_the_compressors() -> None:
    bits = inspect.signature(QsgdCompressor).parameters["bits"].default
    assert CompressionSettings().qsgd_bits == bits
