"""mT5's tokenizer: spiece.model plus T5's conventions, giving the same ids and text as transformers.

transformers (T5TokenizerFast in 4.x, T5Tokenizer in 5.x) first splits the raw text around special tokens, then
normalizes and segments each stretch in between with a Unigram model built from spiece.model's pieces, and
appends </s>. We do the same with sentencepiece, whose own normalization (nmt_nfkc, collapsed whitespace, one "▁"
in front of each stretch) agrees with transformers' Precompiled + Strip + Replace + Metaspace chain on the stretches.
Where the two differ (found by comparing them on fuzzed text), we follow transformers:

- Special tokens (<pad>, </s>, <unk>, <extra_id_N>) typed in the text: sentencepiece spells them out piece by
  piece; transformers matches them on the raw text and gives their ids. We split them out with a regex first.
- transformers' Unigram vocabulary holds <pad>, </s>, <unk> and the extra ids as ordinary pieces of score 0, so
  text that only *normalizes* to one of them (full-width "＜/s＞") gets its id; sentencepiece never emits control
  pieces. So we encode with a copy of the model whose vocabulary is transformers' list: every piece NORMAL with
  its score, the extra ids appended. sentencepiece needs one piece of type UNKNOWN that is not also a normal
  piece, so the copy gets a stand-in unknown piece at the end, mapped back to <unk>'s id after encoding.
- Decoding: sentencepiece renders <unk> as " ⁇ " and drops control pieces; transformers joins the token strings,
  turns "▁" into spaces and drops it from the first token, with no clean-up of spaces for T5. We do the latter.
- U+0085 (NEL) is whitespace to transformers 5.x and an unknown character to 4.x and sentencepiece. We follow
  4.x, the version this project tests against, and sentencepiece, which mT5 was trained with.

Editing the model's pieces uses sentencepiece's sentencepiece_model_pb2, which needs protobuf (ray depends on it).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from .errors import ModelLoadError

SPIECE_NAME = "spiece.model"
CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


class BatchEncoding(dict):
    """input_ids and attention_mask, as lists or [batch, seq] tensors; `**batch` unpacks into generate()."""

    @property
    def input_ids(self):
        return self["input_ids"]

    @property
    def attention_mask(self):
        return self["attention_mask"]

    def to(self, device: torch.device | str) -> BatchEncoding:
        return BatchEncoding({name: tensor.to(device) for name, tensor in self.items()})


@dataclass(frozen=True)
class _Vocabulary:
    processor: spm.SentencePieceProcessor  # the encoding copy: transformers' vocabulary (module docstring)
    size: int  # spiece pieces + extra ids; the stand-in unknown piece sits at this id
    unk_id: int
    raw_tokens: dict[str, int]  # matched on the raw text before sentencepiece sees it
    raw_pattern: re.Pattern  # those tokens as one capturing group, longest first
    special_ids: frozenset[int]  # what skip_special_tokens drops


def _vocabulary(spiece: bytes, extra_ids: int, path: Path) -> _Vocabulary:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(spiece)
    except Exception as e:  # protobuf's DecodeError, or anything else a corrupt file provokes
        raise ModelLoadError(f"{path} is not a sentencepiece model ({e}); copy spiece.model again") from e
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM or not proto.pieces:
        raise ModelLoadError(f"{path} is not a unigram sentencepiece model, as mT5's spiece.model is")
    # transformers' converter matches control and user-defined pieces on the raw text; only the first are special
    raw_types = (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED)
    raw_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in raw_types}
    special_ids = {i for i, p in enumerate(proto.pieces) if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)}
    for piece in proto.pieces:
        piece.type = _Piece.NORMAL
    for n in reversed(range(extra_ids)):  # <extra_id_0> gets the highest id, as in T5
        raw_tokens[f"<extra_id_{n}>"] = len(proto.pieces)
        special_ids.add(len(proto.pieces))
        proto.pieces.add(piece=f"<extra_id_{n}>", score=0.0, type=_Piece.NORMAL)
    size = len(proto.pieces)
    proto.pieces.add(piece="<unknown stand-in>", score=0.0, type=_Piece.UNKNOWN)
    spec = proto.trainer_spec
    spec.unk_id, spec.pad_id, spec.eos_id, spec.bos_id = size, -1, -1, -1
    try:
        processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except RuntimeError as e:
        raise ModelLoadError(f"sentencepiece cannot load {path} ({e}); copy spiece.model again") from e
    if UNK not in raw_tokens:
        raise ModelLoadError(f"{path} has no {UNK} piece; mT5's spiece.model has <pad>, </s>, <unk> at ids 0, 1, 2")
    pattern = "|".join(re.escape(token) for token in sorted(raw_tokens, key=len, reverse=True))
    return _Vocabulary(processor, size, raw_tokens[UNK], raw_tokens, re.compile(f"({pattern})"), frozenset(special_ids))


class MT5Tokenizer:
    """Text to mT5 ids and back, matching transformers' T5 tokenizer loaded from the same spiece.model."""

    def __init__(
        self, spiece: bytes, *, extra_ids: int = 100, model_max_length: int | None = None, path: Path = Path(SPIECE_NAME)
    ):
        self._spiece = spiece  # the original bytes, for save_pretrained
        self.extra_ids = extra_ids
        self.model_max_length = model_max_length
        self._vocab = _vocabulary(spiece, extra_ids, path)
        self.vocab_size = self._vocab.size
        self.unk_token_id = self._vocab.unk_id
        self.pad_token_id, self.eos_token_id = (self._required_id(token, path) for token in (PAD, EOS))

    def _required_id(self, token: str, path: Path) -> int:
        if token not in self._vocab.raw_tokens:
            raise ModelLoadError(f"{path} has no {token} control piece; mT5's spiece.model has <pad>, </s>, <unk>")
        return self._vocab.raw_tokens[token]

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> MT5Tokenizer:
        """Loads spiece.model and tokenizer_config.json from a checkpoint directory, URI or hub id."""
        from .checkpoint import read_json, resolve_checkpoint

        directory = resolve_checkpoint(source)
        path = directory / SPIECE_NAME
        try:
            spiece = path.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(
                f"{path} is missing: {directory} has no sentencepiece model. Copy spiece.model from the checkpoint "
                "the weights came from (e.g. google/mt5-small) into it"
            ) from None
        except OSError as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from e
        config = read_json(directory, CONFIG_NAME, required=False) or {}
        special_map = read_json(directory, SPECIAL_TOKENS_MAP_NAME, required=False) or {}
        extra_ids = config.get("extra_ids", 100)
        if not isinstance(extra_ids, int) or extra_ids < 0:
            raise ModelLoadError(f"{directory / CONFIG_NAME}: extra_ids must be a count >= 0, not {extra_ids!r}")
        _check_special_tokens(config, extra_ids, directory / CONFIG_NAME)
        _check_special_tokens(special_map, extra_ids, directory / SPECIAL_TOKENS_MAP_NAME)
        return cls(spiece, extra_ids=extra_ids, model_max_length=config.get("model_max_length"), path=path)

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Writes spiece.model, tokenizer_config.json and special_tokens_map.json, loadable by AutoTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extras = [f"<extra_id_{n}>" for n in range(self.extra_ids)]
        special = {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": extras}
        # legacy=True is what mT5's own config implies; saying so keeps transformers 4.x from warning about it
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": self.extra_ids, "legacy": True, **special}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        files = [directory / SPIECE_NAME, directory / CONFIG_NAME, directory / SPECIAL_TOKENS_MAP_NAME]
        files[0].write_bytes(self._spiece)
        files[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        files[2].write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return files

    # ------------------------------------------------------------------------------------------------------------
    # Text to ids

    def __call__(
        self,
        texts: str | list[str],
        max_length: int | None = None,
        truncation: bool = False,
        padding: bool | str = False,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """input_ids and attention_mask for one text (flat lists) or a batch, as transformers' tokenizer(...)."""
        single = isinstance(texts, str)
        ids = self._encode_batch([texts] if single else list(texts), add_special_tokens)
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            if limit is not None:
                ids = [self._truncate(seq, limit, add_special_tokens) for seq in ids]
        width = self._padded_width(ids, padding, max_length)
        mask = [[1] * len(seq) + [0] * (width - len(seq)) for seq in ids]
        ids = [seq + [self.pad_token_id] * (width - len(seq)) for seq in ids]  # right padding; no-op for width 0
        if return_tensors == "pt":
            if len({len(seq) for seq in ids}) > 1:
                raise ValueError("texts tokenize to different lengths; pass padding=True to return tensors")
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}; only None (lists) and 'pt' are supported")
        if single:
            return BatchEncoding(input_ids=ids[0], attention_mask=mask[0])
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encode_batch([text], add_special_tokens)[0]

    def _encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is a {type(text).__name__}, not a str")
        vocab = self._vocab
        # [stretch, special token, stretch, ...] per text; usually just [text]
        parts = [vocab.raw_pattern.split(text) for text in texts]
        # one call for every stretch of every text: sentencepiece encodes a list on all cores
        stretches = iter(vocab.processor.encode([stretch for p in parts for stretch in p[::2]]))
        stand_in = vocab.size
        batch = []
        for p in parts:
            ids = []
            for k, part in enumerate(p):
                ids.extend(next(stretches) if k % 2 == 0 else [vocab.raw_tokens[part]])
            if stand_in in ids:
                ids = [vocab.unk_id if i == stand_in else i for i in ids]
            if add_special_tokens:
                ids.append(self.eos_token_id)
            batch.append(ids)
        return batch

    def _truncate(self, ids: list[int], limit: int, add_special_tokens: bool) -> list[int]:
        if len(ids) <= limit:
            return ids
        if not add_special_tokens:
            return ids[:limit]
        if limit < 1:
            raise ValueError(f"max_length={limit} leaves no room for </s>; pass max_length >= 1")
        return ids[: limit - 1] + [self.eos_token_id]  # transformers keeps </s> last: truncate, then append it

    def _padded_width(self, ids: list[list[int]], padding: bool | str, max_length: int | None) -> int:
        if padding is False or padding == "do_not_pad":
            return 0
        if padding is True or padding == "longest":
            return max((len(seq) for seq in ids), default=0)
        if padding == "max_length":
            width = max_length if max_length is not None else self.model_max_length
            if width is None:
                raise ValueError("padding='max_length' needs max_length, or model_max_length in tokenizer_config.json")
            return width  # longer sequences stay longer, as in transformers
        raise ValueError(f"padding={padding!r}; use False, True, 'longest' or 'max_length'")

    # ------------------------------------------------------------------------------------------------------------
    # Ids to text

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"cannot decode negative id {min(ids)}; replace label padding (-100) by pad_token_id")
        # mT5's embedding has a few more rows than the tokenizer has ids (250112 vs 250100); transformers drops
        # ids past the vocabulary when decoding, and so do we
        skip = self._vocab.special_ids if skip_special_tokens else frozenset()
        tokens = self._vocab.processor.id_to_piece([i for i in ids if i < self.vocab_size and i not in skip])
        if not tokens:
            return ""
        # transformers' Metaspace decoder: every "▁" is a space, except in the first token, where it is dropped
        return tokens[0].replace("▁", "") + "".join(tokens[1:]).replace("▁", " ")

    def batch_decode(self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    # ------------------------------------------------------------------------------------------------------------
    # Tokens and ids

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.convert_tokens_to_ids([tokens])[0]
        ids = self._vocab.processor.piece_to_id(tokens)
        return [self.unk_token_id if i == self.vocab_size else i for i in ids]  # unknown tokens: the stand-in

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._vocab.processor.id_to_piece(ids) if 0 <= ids < self.vocab_size else None
        skip = self._vocab.special_ids if skip_special_tokens else frozenset()
        return [self.convert_ids_to_tokens(i) for i in ids if i not in skip]

    def __len__(self) -> int:
        return self.vocab_size


def _check_special_tokens(config: dict, extra_ids: int, path: Path) -> None:
    """Refuses special tokens other than T5's: transformers would add them to the vocabulary, and we do not."""
    for key, expected in (("pad_token", PAD), ("eos_token", EOS), ("unk_token", UNK)):
        if _content(config.get(key, expected)) != expected:
            raise ModelLoadError(f"{path}: {key} is {config[key]!r}; this tokenizer supports mT5's {expected!r} only")
    for key in ("bos_token", "sep_token", "cls_token", "mask_token"):
        if config.get(key) is not None:
            raise ModelLoadError(f"{path}: {key} is set; mT5 has none and this tokenizer supports none")
    extras = sorted(_content(token) for token in config.get("additional_special_tokens") or [])
    if extras and extras != sorted(f"<extra_id_{n}>" for n in range(extra_ids)):
        raise ModelLoadError(
            f"{path}: additional_special_tokens must be <extra_id_0>..<extra_id_{extra_ids - 1}> (extra_ids="
            f"{extra_ids}) or absent; other added tokens are not supported"
        )


def _content(token: str | dict) -> str:
    return token["content"] if isinstance(token, dict) else token  # transformers saves AddedTokens as dicts
