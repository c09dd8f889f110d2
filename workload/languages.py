"""The corpus languages the demo and the evaluation use, without loading the data code.

Separate from :mod:`workload.data` (numpy, PyYAML) because the ``fedfstq`` command's option
defaults need it and ``fedfstq --help`` must stay fast.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LANGUAGES"]

#: The demo's and the evaluation's languages: the chatterbot-corpus languages with the most
#: Q/A pairs among those SmolLM2's tokenizer handles well (Latin script).
DEFAULT_LANGUAGES = ("english", "spanish", "italian", "portuguese", "german", "indonesian")
