"""MT5Config: the fields of a Hugging Face mT5 `config.json`, parsed once and checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

# The two feed-forward kinds T5/mT5 checkpoints use: mT5 is gated-gelu, the original T5 relu.
FEED_FORWARD_KINDS = ("gated-gelu", "relu")


@dataclass
class MT5Config:
    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    classifier_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "gated-gelu"
    # Real mT5 checkpoints are untied; the T5 default (True) is what transformers assumes when absent.
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Heads: sequence / token classification and question answering.
    num_labels: int = 2
    problem_type: str | None = None
    id2label: dict[int, str] | None = None
    # Fields we do not use but keep, so that save_pretrained writes back what it read.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.feed_forward_proj not in FEED_FORWARD_KINDS:
            raise ConfigError(
                f"config.json: feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"use one of {', '.join(FEED_FORWARD_KINDS)}"
            )
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config.json: {name}={value!r} is outside the vocabulary (size {self.vocab_size})")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"config.json: dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ConfigError(f"config.json: unknown problem_type {self.problem_type!r}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # "gated-gelu" means gelu_new (the tanh approximation), as in transformers.
        return "gelu_new" if self.is_gated else "relu"

    @property
    def inner_dim(self) -> int:
        # Not d_model: mt5-small has d_model 512 but 6 heads x 64 = 384.
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "MT5Config":
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type not in (None, "mt5", "t5"):
            raise ConfigError(f"{source}: model_type={model_type!r}, expected 'mt5' (or 't5')")
        # Old T5 configs say n_positions etc.; transformers maps these aliases too.
        for alias, name in (
            ("hidden_size", "d_model"),
            ("num_attention_heads", "num_heads"),
            ("num_hidden_layers", "num_layers"),
        ):
            if alias in raw and name not in raw:
                raw[name] = raw.pop(alias)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            raw["eos_token_id"] = eos[0]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(str(err).replace("config.json", source, 1)) from None
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        """The config.json that transformers reads back as the same model."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        if out["id2label"] is None:
            del out["id2label"]
        else:
            out["label2id"] = {v: k for k, v in out["id2label"].items()}
        out["model_type"] = "mt5"
        out["is_encoder_decoder"] = True
        out.setdefault("dense_act_fn", self.activation)
        out.setdefault("is_gated_act", self.is_gated)
        return out
