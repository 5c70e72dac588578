"""The embedded default: a synthetic world and a tiny base / post-trained model pair.

Light to import: heavy pieces (torch, transformers) load only from the submodules that need them.
"""

from mechdiff.zoo.paths import zoo_path
from mechdiff.zoo.templates import (
    BASE_TEMPLATE,
    CHAT_TEMPLATE,
    REFUSAL_MARKERS,
    REFUSAL_PHRASES,
    base_prompt,
    chat_prompt,
    is_refusal,
    truth_prompt,
)

__all__ = [
    "BASE_TEMPLATE", "CHAT_TEMPLATE", "REFUSAL_MARKERS", "REFUSAL_PHRASES",
    "base_prompt", "chat_prompt", "is_refusal", "truth_prompt", "zoo_path",
]
