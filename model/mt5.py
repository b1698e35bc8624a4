"""The six mT5 model classes of the transformers docs, on one shared encoder/decoder implementation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, weights
from .config import MT5Config
from .modules import (
    CrossAttention,
    Decoder,
    Embedding,
    Encoder,
    FeedForward,
    RelativePositionBias,
    RMSNorm,
    SelfAttention,
)
from .packed import int8_head_engine, int8_source_engine, pack_for_cpu
from .quantization_methods import METHODS as QUANTIZATIONS
from .quantize import Int8HeadBlocks, is_quantized, quantize
from .vocabulary import restrict_vocabulary

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class ModelOutput:
    """What a forward returns; each head fills the fields the transformers docs give it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None


class MT5PreTrainedModel(nn.Module):
    """Loading, saving and initialisation, common to the six classes."""

    def __init__(self, config: MT5Config):
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        quantization: str = "none",
        revision: str | None = None,
        kept_ids: Iterable[int] | None = None,
        pack_head: bool = False,
        pack_linears: bool = False,
    ):
        """Load a Hugging Face mT5 checkpoint: a directory, an fsspec URI or a hub id.

        The model is built on the meta device and its parameters are assigned straight from the
        memory-mapped safetensors in the target dtype and device, so no float32 copy is made.
        `quantization` swaps the blocks' linear layers for quantized ones (model.quantize.METHODS); the model is
        then loaded in host memory and each layer quantized as it moves to `device`, which never holds the whole
        model in full precision.
        `kept_ids`: the only ids the model may generate (model.vocabulary.restrict_vocabulary), restricted before
        quantizing, so that int8-dynamic quantizes the smaller head. `pack_head`: the output head laid out for CPU
        inference (model.packed.pack_head_for_cpu; an int8-dynamic head is packed for its engine as it is quantized,
        once); a packed head takes no gradient. `pack_linears`, with pack_head: the encoder's and decoder's float32
        projections too (model.packed.pack_for_cpu). model.load_for_inference loads with all of them.
        """
        dtype = as_dtype(dtype)
        if quantization not in QUANTIZATIONS:  # before reading any weight
            raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        model, directory = cls._on_meta(source, cache_dir, revision)
        host = torch.device("cpu") if quantization != "none" else device
        weights.load_into(model, directory, dtype=dtype, device=host)
        model.eval()
        if kept_ids is not None:  # before quantizing: int8-dynamic then quantizes the smaller head
            restrict_vocabulary(model, kept_ids)
        # after eval(): the new layers copy the training flag
        head_engine = (int8_head_engine(model) or torch.backends.quantized.engine) if pack_head else None
        source_engine = int8_source_engine() if pack_head else None
        quantize(model, quantization, device=device, head_engine=head_engine, source_engine=source_engine)
        if pack_head:
            pack_for_cpu(model, projections=pack_linears)
        model._after_load(directory)
        return model

    @classmethod
    def check_pretrained(
        cls, source: str | Path, *, cache_dir: str | Path | None = None, revision: str | None = None
    ) -> Path:
        """What from_pretrained checks, from config.json and the safetensors headers alone: no weight is
        read. Returns the local checkpoint directory. For failing fast before a cluster does any work."""
        model, directory = cls._on_meta(source, cache_dir, revision)
        weights.check(model, directory)
        return directory

    @classmethod
    def _on_meta(cls, source, cache_dir, revision=None):
        directory = checkpoint.resolve_checkpoint(source, cache_dir=cache_dir, revision=revision)
        with torch.device("meta"):
            return cls(checkpoint.read_config(directory)), directory

    def _after_load(self, directory: Path) -> None:
        """Hook for what a class reads beside the weights (generation_config.json)."""

    def save_pretrained(self, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json and safetensors in the Hugging Face layout, loadable by transformers."""
        if is_quantized(self):
            raise ValueError(
                "save_pretrained writes full-precision checkpoints: save the model before quantizing it "
                "(quantization is applied at load time with from_pretrained(..., quantization=...))"
            )
        tensors = weights.to_hf_state_dict(self)  # before any file: a restricted head refuses (model/vocabulary.py)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        config["torch_dtype"] = str(self.shared.weight.dtype if hasattr(self, "shared") else torch.float32)[6:]
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        checkpoint.save_tensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype if hasattr(self, "shared") else self.transformer.shared.weight.dtype

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from labels: decoder_start first, -100 (ignored positions) read as pad."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    @torch.no_grad()
    def init_weights(self) -> "MT5PreTrainedModel":
        """Mesh TensorFlow's initialisation, as transformers does it (for training from scratch and new heads)."""
        c, f = self.config, self.config.initializer_factor
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(f)
            elif isinstance(module, RelativePositionBias):
                module.embedding.weight.normal_(0.0, f * c.d_model**-0.5)
            elif isinstance(module, SelfAttention):
                q, kv = module.qkv.weight.split([c.inner_dim, 2 * c.inner_dim])
                q.normal_(0.0, f * (c.d_model * c.d_kv) ** -0.5)
                kv.normal_(0.0, f * c.d_model**-0.5)
                module.o.weight.normal_(0.0, f * c.inner_dim**-0.5)
            elif isinstance(module, CrossAttention):
                module.q.weight.normal_(0.0, f * (c.d_model * c.d_kv) ** -0.5)
                module.kv.weight.normal_(0.0, f * c.d_model**-0.5)
                module.o.weight.normal_(0.0, f * c.inner_dim**-0.5)
            elif isinstance(module, FeedForward):
                module.wi.weight.normal_(0.0, f * c.d_model**-0.5)
                module.wo.weight.normal_(0.0, f * c.d_ff**-0.5)
        shared = self.shared if hasattr(self, "shared") else self.transformer.shared
        shared.weight.normal_(0.0, f)
        for name in ("lm_head", "qa_outputs", "classifier"):
            head = getattr(self, name, None)
            if head is not None and not (name == "lm_head" and c.tie_word_embeddings):
                head.weight.normal_(0.0, f if name == "lm_head" else f * c.d_model**-0.5)
                if head.bias is not None:
                    head.bias.zero_()
        return self


class MT5EncoderModel(MT5PreTrainedModel):
    def __init__(self, config: MT5Config):
        super().__init__(config)
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.shared(input_ids), attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        return ModelOutput(last_hidden_state=self.encode(input_ids, attention_mask))


class _EncoderDecoder(MT5PreTrainedModel):
    """shared + encoder + decoder: the body of MT5Model, conditional generation and QA."""

    def __init__(self, config: MT5Config):
        super().__init__(config)
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.shared(input_ids), attention_mask)

    def run(
        self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder hidden states, encoder hidden states) for a whole target sequence (no cache)."""
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask)
        elif isinstance(encoder_outputs, ModelOutput):
            encoder_outputs = encoder_outputs.last_hidden_state
        cross_kv = self.decoder.project_cross_kv(encoder_outputs)
        hidden = self.decoder(self.shared(decoder_input_ids), cross_kv, attention_mask, decoder_attention_mask)
        return hidden, encoder_outputs


class MT5Model(_EncoderDecoder):
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
    ) -> ModelOutput:
        hidden, encoded = self.run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs
        )
        return ModelOutput(last_hidden_state=hidden, encoder_last_hidden_state=encoded)


class MT5ForConditionalGeneration(_EncoderDecoder):
    def __init__(self, config: MT5Config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        from .generate import GenerationConfig

        self.generation_config = GenerationConfig.from_model_config(config)

    def _after_load(self, directory: Path) -> None:
        from .generate import GenerationConfig

        raw = checkpoint.read_json(directory, "generation_config.json", required=False)
        if raw is not None:
            self.generation_config = GenerationConfig.from_dict(raw, self.config)

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:
        super().save_pretrained(out_dir, **kwargs)
        self.generation_config.save(Path(out_dir))

    def lm_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., vocab_size] of `hidden` [..., d_model].

        Every output head (nn.Linear, packed, quantized, restricted) maps hidden to scores over the ids it
        covers: `kept_ids` names them when it has some (model/vocabulary.py), and otherwise it covers the
        whole vocabulary in order. Ids a head does not cover get -inf, written into `out` [..., vocab_size]
        when given (decode steps reuse it: a fresh vocabulary-sized tensor per step costs page faults)."""
        if self.config.tie_word_embeddings:
            # Tied T5 rescales before the shared embedding; real (untied) mT5 checkpoints do not.
            hidden = hidden * self.config.d_model**-0.5
        if out is not None and isinstance(self.lm_head, Int8HeadBlocks):
            return self.lm_head(hidden, out=out)  # written block by block into `out`: no fresh vocabulary-sized tensor
        scores = self.lm_head(hidden)  # [..., ids the head covers]
        ids = getattr(self.lm_head, "kept_ids", None)
        if ids is None:
            return scores
        if out is None or out.dtype != scores.dtype:
            out = scores.new_empty((*scores.shape[:-1], self.config.vocab_size))
        logits = out.fill_(float("-inf"))  # [..., vocab]
        logits[..., ids] = scores
        return logits

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        labels=None,
        encoder_outputs=None,
    ) -> ModelOutput:
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = self.shift_right(labels)
        hidden, encoded = self.run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs
        )
        logits = self.lm_logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoded)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **settings):
        """transformers-style generate: greedy, beam search or sampling; see model/generate.py and model/decode.py."""
        from .generate import generate

        return generate(self, input_ids, attention_mask, self.generation_config.updated(**settings))


class ClassificationHead(nn.Module):
    def __init__(self, config: MT5Config):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))


class MT5ForSequenceClassification(MT5PreTrainedModel):
    """Classifies from the decoder state at the input's last EOS (decoder inputs default to the shifted input)."""

    def __init__(self, config: MT5Config):
        super().__init__(config)
        self.transformer = MT5Model(config)
        self.classification_head = ClassificationHead(config)

    def forward(
        self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, labels=None
    ) -> ModelOutput:
        if decoder_input_ids is None:
            decoder_input_ids = self.shift_right(input_ids)
        hidden, _ = self.transformer.run(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, None)
        eos = input_ids.eq(self.config.eos_token_id)
        counts = eos.sum(1)
        if (counts != counts[0]).any() or counts[0] == 0:
            raise ValueError("every example must have the same, non-zero number of </s> tokens")
        batch, _, dim = hidden.shape
        logits = self.classification_head(hidden[eos, :].view(batch, -1, dim)[:, -1, :])
        return ModelOutput(loss=self._loss(logits, labels) if labels is not None else None, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem  # as transformers does: decided once, from the first labels
        if problem == "regression":
            if self.config.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class MT5ForTokenClassification(MT5PreTrainedModel):
    def __init__(self, config: MT5Config):
        super().__init__(config)
        self.transformer = MT5EncoderModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None) -> ModelOutput:
        hidden = self.transformer.encode(input_ids, attention_mask)
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return ModelOutput(loss=loss, logits=logits)


class MT5ForQuestionAnswering(_EncoderDecoder):
    """Span extraction: start and end logits from the decoder states (decoder inputs default to the shifted input)."""

    def __init__(self, config: MT5Config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.d_model, config.num_labels)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        start_positions=None,
        end_positions=None,
    ) -> ModelOutput:
        if decoder_input_ids is None:
            decoder_input_ids = self.shift_right(input_ids)
        hidden, encoded = self.run(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, None)
        start_logits, end_logits = self.qa_outputs(hidden).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input are ignored, as in transformers.
            ignored = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, ignored)
            end = end_positions.reshape(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        return ModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, encoder_last_hidden_state=encoded
        )
