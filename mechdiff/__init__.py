"""mechdiff: compare base LLMs with their post-trained versions from the inside.

The notebook API::

    from mechdiff import load_model, CaptureSpec, extract, open_store, ModelGroup
    from mechdiff.studies import truthfulness, refusal, knowledge, confidence   # each with Config and run

Names load on first use, so ``import mechdiff`` stays cheap (the extraction path imports only what it uses).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mechdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "load_model": "mechdiff.engine.models",
    "LoadedModel": "mechdiff.engine.models",
    "CaptureSpec": "mechdiff.engine.capture",
    "extract": "mechdiff.engine.extract",
    "open_store": "mechdiff.engine.store",
    "PromptSet": "mechdiff.engine.data",
    "load_prompts": "mechdiff.engine.data",
    "ModelGroup": "mechdiff.analyses.common",
    "StudyResult": "mechdiff.analyses.common",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mechdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
