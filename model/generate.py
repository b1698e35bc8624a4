"""Generation settings (transformers' GenerationConfig and generation_config.json) and generate(), the
transformers-style call: a batch in, token ids out, through the one decode engine (model/decode.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MT5Config
from .decode import decode_stream


@dataclass
class GenerationConfig:
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    early_stopping: bool | str = False
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Decode through the compiled step (model/compiled_decode.py): the same tokens, faster where the eager step
    # is launch-bound (a GPU). Ours, not transformers': not written to generation_config.json.
    compile: bool = False
    # Fields of generation_config.json we do not use, written back on save.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be >= 1")
        if self.num_return_sequences > self.num_beams and (self.num_beams > 1 or not self.do_sample):
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs num_beams >= that "
                f"(got {self.num_beams}), or do_sample=True with num_beams=1"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_dict(cls, raw: dict, model_config: MT5Config | None = None) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {}
        if model_config is not None:
            values.update(
                pad_token_id=model_config.pad_token_id,
                eos_token_id=model_config.eos_token_id,
                decoder_start_token_id=model_config.decoder_start_token_id,
            )
        values.update({k: v for k, v in raw.items() if k in known and v is not None})
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})

    @classmethod
    def from_model_config(cls, config: MT5Config) -> "GenerationConfig":
        """Defaults when a checkpoint has no generation_config.json: generation fields in config.json, as
        transformers does for older checkpoints."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls.from_dict({k: v for k, v in config.extra.items() if k in known}, config)

    def updated(self, **settings) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"generate() got unknown settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **settings)

    def total_length(self) -> int:
        """Output length cap, counting the decoder start token as transformers does."""
        return 1 + self.max_new_tokens if self.max_new_tokens is not None else self.max_length

    def rows_per_document(self) -> int:
        """The rows a document takes in a decode batch: one per beam in beam search (sampled or not), one per
        returned sequence in sampling, one in greedy."""
        if self.num_beams > 1:
            return self.num_beams
        return self.num_return_sequences if self.do_sample else 1

    def save(self, out_dir: Path) -> None:
        out = dict(self.extra)
        unsaved = ("extra", "seed", "compile")
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in unsaved})
        out = {k: v for k, v in out.items() if v is not None}
        (out_dir / "generation_config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def generate(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig
) -> torch.Tensor:
    """Token ids [batch * num_return_sequences, length], starting with decoder_start, as transformers returns:
    the batch streams through decode_stream all at once, and each input's outputs come back in input order
    (beam search: its best num_return_sequences; sampling: that many draws), padded to the longest."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    sources = input_ids.tolist()
    if attention_mask is not None:
        sources = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(sources, attention_mask.tolist())]
    rows = len(sources) * config.rows_per_document()
    outputs = dict(decode_stream(model, enumerate(sources), config, max_rows=rows))
    sequences = [ids for i in range(len(sources)) for ids in outputs[i]]
    # transformers pads greedy and sampled outputs with pad_token_id, beam search's with
    # `pad_token_id or eos_token_id`: EOS for mT5, whose pad id is 0.
    fill = (config.pad_token_id or config.eos_token_id) if config.num_beams > 1 else config.pad_token_id
    out = torch.full((len(sequences), max(map(len, sequences))), fill, dtype=torch.long)
    for row, ids in zip(out, sequences):
        row[: len(ids)] = torch.tensor(ids)
    return out.to(model.device)
