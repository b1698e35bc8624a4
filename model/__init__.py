"""mT5 in plain PyTorch: loads Hugging Face checkpoints and gives the same tokens as transformers.

The names below are imported on first use, so that a module of this package that needs no torch (storage.py,
which the driver's planning processes import) can be imported without it.
"""

import importlib

_EXPORTS = {
    "ConfigError": "errors",
    "ModelLoadError": "errors",
    "GenerationConfig": "generate",
    "MT5Config": "config",
    "MT5EncoderModel": "mt5",
    "MT5ForConditionalGeneration": "mt5",
    "MT5ForQuestionAnswering": "mt5",
    "MT5ForSequenceClassification": "mt5",
    "MT5ForTokenClassification": "mt5",
    "MT5Model": "mt5",
    "ModelOutput": "mt5",
    "MT5Tokenizer": "tokenizer",
    "load_for_inference": "inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value
