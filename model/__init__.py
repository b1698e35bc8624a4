"""mT5 in plain PyTorch: loads Hugging Face checkpoints and gives the same tokens as transformers."""
from .config import MT5Config
from .errors import ConfigError, ModelLoadError
from .generate import GenerationConfig
from .mt5 import (
    MT5EncoderModel,
    MT5ForConditionalGeneration,
    MT5ForQuestionAnswering,
    MT5ForSequenceClassification,
    MT5ForTokenClassification,
    MT5Model,
    ModelOutput,
)
from .tokenizer import MT5Tokenizer

__all__ = [
    "ConfigError", "GenerationConfig", "MT5Config", "MT5EncoderModel", "MT5ForConditionalGeneration",
    "MT5ForQuestionAnswering", "MT5ForSequenceClassification", "MT5ForTokenClassification", "MT5Model",
    "MT5Tokenizer", "ModelLoadError", "ModelOutput",
]
