"""mT5's tokenizer: spiece.model plus T5's conventions, giving the same ids and text as transformers.

transformers' T5 tokenizer (T5TokenizerFast in 4.x) runs `tokenizers` components over the text. We run the same
steps, with sentencepiece doing only the unigram segmentation:

1. Special tokens (<pad>, </s>, <unk>, <extra_id_N>) are matched on the raw text and become their ids.
2. Each stretch in between is normalized by spiece.model's precompiled nmt_nfkc table, grapheme by grapheme.
3. Trailing whitespace is stripped, each run of spaces becomes one "▁", and a "▁" goes in front.
4. The words, each led by its "▁", are segmented by a unigram model over spiece.model's pieces plus the extra
   ids, and </s> is appended.

sentencepiece on the raw text gives the same ids on most text, but not on all of it. Comparing the two on fuzzed
text found these differences, which is why steps 1-3 are done here:
- Special tokens typed in the text are spelled out piece by piece by sentencepiece.
- `tokenizers` looks a grapheme of under 6 UTF-8 bytes up as a whole and takes the entry of its *shortest*
  prefix that has one, dropping the rest ("ẛ̣" becomes "ṡ", not "ṩ"), and maps longer graphemes one character at
  a time, so it never composes "ｶﾞ" into "ガ". sentencepiece takes the longest match anywhere. So we read the
  table ourselves and apply it the way `tokenizers` does.
- Trailing whitespace other than spaces (U+0085) is stripped by transformers and kept by sentencepiece.
- transformers' unigram vocabulary holds <pad>, </s>, <unk> and the extra ids as ordinary pieces of score 0, so
  text that only normalizes to one of them (full-width "＜/s＞") gets its id. sentencepiece never emits control
  pieces, so we segment with a copy of the model whose vocabulary is transformers' list (see `_Vocabulary`).
- sentencepiece renders <unk> as " ⁇ " when decoding. transformers joins the token strings and turns "▁" into
  spaces; so do we.
Known differences that remain:
- sentencepiece adds scores in float32, `tokenizers` in float64. On long unspaced text (Chinese, Japanese, Thai)
  two segmentations of equal score ("川川|川" and "川|川川") are then sometimes told apart differently: about once
  in a million characters on our fixture vocabulary.
- Python 3.11 knows Unicode 14; combining marks assigned since then do not join graphemes here.
- transformers 5.x splits words on all whitespace, so U+0085 inside text is a space there, and an unknown
  character in 4.x and in sentencepiece. We follow 4.x, the version this project tests against.
Editing the model uses sentencepiece_model_pb2, which needs protobuf (ray depends on it).
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import unicodedata
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
# Rust's char::is_whitespace, which transformers' Strip normalizer uses: Python's isspace() minus \x1c-\x1f
_RUST_WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace() and not 0x1C <= c <= 0x1F)


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


class _Normalizer:
    """The model's precompiled normalization table, applied per grapheme as `tokenizers`' Precompiled does.

    The table is sentencepiece's: a uint32 trie size, a darts-clone double-array trie over UTF-8 bytes, then the
    NUL-terminated replacement strings the trie's values point into. `tokenizers` replaces a grapheme of under 6
    bytes by the entry of its shortest prefix that has one, and maps every other grapheme char by char.
    """

    def __init__(self, charsmap: bytes):
        (trie_size,) = struct.unpack_from("<I", charsmap)
        self._units = struct.unpack_from(f"<{trie_size // 4}I", charsmap, 4)
        self._replacements = charsmap[4 + trie_size :]
        self._chars = _CharTable(self.lookup)  # for str.translate
        self._short_graphemes: dict[str, str | None] = {}

    def lookup(self, text: str) -> str | None:
        """The replacement for the shortest prefix of `text` in the table (`tokenizers` uses that, not the longest)."""
        units = self._units
        position = (units[0] >> 10) << ((units[0] & 512) >> 6)
        for byte in text.encode():
            position ^= byte
            unit = units[position]
            if unit & 0x800000FF != byte:  # the unit's label: this byte leaves the trie
                return None
            position ^= (unit >> 10) << ((unit & 512) >> 6)
            if unit & 256:  # a key ends here
                start = units[position] & 0x7FFFFFFF
                return self._replacements[start : self._replacements.index(0, start)].decode()
        return None

    def __call__(self, text: str) -> str:
        graphemes = _graphemes()
        if not graphemes.short_hint.search(text):  # most text: no grapheme of 2+ characters under 6 bytes
            return text.translate(self._chars)
        pieces, done = [], 0
        for match in graphemes.pattern.finditer(text):
            grapheme = match.group()
            if len(grapheme.encode()) >= 6:
                continue
            if grapheme not in self._short_graphemes:
                self._short_graphemes[grapheme] = self.lookup(grapheme)
            whole = self._short_graphemes[grapheme]
            if whole is not None:
                pieces += [text[done : match.start()].translate(self._chars), whole]
                done = match.end()
        pieces.append(text[done:].translate(self._chars))
        return "".join(pieces)


class _CharTable(dict):
    """code point -> its replacement, looked up once per character."""

    def __init__(self, lookup):
        super().__init__()
        self._lookup = lookup

    def __missing__(self, code: int) -> str:
        replacement = self._lookup(chr(code))
        self[code] = chr(code) if replacement is None else replacement
        return self[code]


@dataclass(frozen=True)
class _GraphemePatterns:
    pattern: re.Pattern  # graphemes of 2+ characters: prepended marks, a base, combining marks
    short_hint: re.Pattern  # found in every text that has such a grapheme under 6 bytes, and in few others


@functools.cache
def _graphemes() -> _GraphemePatterns:
    """Unicode's grapheme rules, as far as they build graphemes of 2+ characters under 6 bytes.

    Only those behave differently from their characters one by one. Hangul syllables, emoji sequences and Indic
    conjuncts always take 6 bytes or more, so those rules are left out. Python has no grapheme-break property:
    combining marks (Mn, Me, Mc), joiners, emoji modifiers, tags and a few listed characters stand in for Extend
    and SpacingMark, and Cc, Cf, Zl, Zp for Control. CR LF is a grapheme whose lookup gives one space instead of
    two, which step 3 then makes the same, so it is left out too.
    """
    chars = [chr(c) for c in (*range(0x20000), *range(0xE0000, 0xE1000))]  # planes 0, 1, 14: all the marks
    # joiners, half-width voicing marks, Thai and Lao AM, emoji skin tones, tags
    listed = {*"\u200c\u200d\uff9e\uff9f\u0e33\u0eb3", *map(chr, [*range(0x1F3FB, 0x1F400), *range(0xE0020, 0xE0080)])}
    marks = [c for c in chars if c in listed or unicodedata.category(c) in ("Mn", "Me", "Mc")]
    prepend = [*range(0x600, 0x606), 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0xD4E, 0x110BD, 0x110CD, 0x111C2, 0x111C3]
    prepend = [chr(c) for c in (*prepend, 0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02)]
    controls = [c for c in chars if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    mark, pre = _char_class(marks), _char_class(prepend)
    control = _char_class([c for c in controls if c not in listed and c not in prepend])
    # a 3-byte mark makes a grapheme under 6 bytes only after a base of 1 or 2 bytes. A 4-byte mark only after an
    # ASCII one, which the table does not map (checked in _Vocabulary.load), so the hint leaves those out.
    two_byte_marks = _char_class([c for c in marks if c < "\u0800"])
    three_byte_marks = _char_class([c for c in marks if "\u0800" <= c <= "\uffff"])
    return _GraphemePatterns(
        pattern=re.compile(f"[{pre}]*[^{control}][{mark}]+|[{pre}]+[^{control}]"),
        short_hint=re.compile(f"[{two_byte_marks}{pre}]|[\\x00-\\u07ff][{three_byte_marks}]"),
    )


def _char_class(chars: list[str]) -> str:
    """A regex character class body for sorted characters, as ranges."""
    ranges, start = [], chars[0]
    for previous, current in zip(chars, chars[1:] + [""]):
        if not current or ord(current) != ord(previous) + 1:
            ranges.append(re.escape(start) + ("" if previous == start else "-" + re.escape(previous)))
            start = current
    return "".join(ranges)


@dataclass(frozen=True)
class _Vocabulary:
    """What encoding needs from spiece.model, laid out as transformers lays it out."""

    processor: spm.SentencePieceProcessor  # segments words over transformers' vocabulary; see `load`
    normalizer: _Normalizer
    size: int  # spiece pieces + extra ids; the stand-in unknown piece sits at this id
    raw_tokens: dict[str, int]  # matched on the raw text, before normalization
    raw_pattern: re.Pattern  # those tokens, longest first, as one capturing group
    special_ids: frozenset[int]  # what skip_special_tokens drops
    # transformers segments word by word. When no piece holds a "▁" past its first character (sentencepiece's
    # default training, split_by_whitespace, makes none), no piece can straddle two words, and segmenting a
    # whole stretch at once gives the same pieces several times faster. Checked per model in `load`.
    whole_stretches: bool

    @classmethod
    def load(cls, spiece: bytes, extra_ids: int, path: Path) -> _Vocabulary:
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(spiece)
        except Exception as e:  # protobuf's DecodeError, or whatever else a corrupt file provokes
            raise ModelLoadError(f"{path} is not a sentencepiece model ({e}); copy spiece.model again") from e
        if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM or not proto.pieces:
            raise ModelLoadError(f"{path} is not a unigram sentencepiece model, as mT5's spiece.model is")
        # transformers' converter matches control and user-defined pieces on the raw text; only control is special
        special_types = (_Piece.CONTROL, _Piece.UNKNOWN)
        raw_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (*special_types, _Piece.USER_DEFINED)}
        special_ids = {i for i, p in enumerate(proto.pieces) if p.type in special_types}
        whole_stretches = not any("▁" in p.piece[1:] for p in proto.pieces)
        if not proto.normalizer_spec.precompiled_charsmap:
            raise ModelLoadError(f"{path} has no normalization table; mT5's spiece.model normalizes with nmt_nfkc")
        normalizer = _Normalizer(proto.normalizer_spec.precompiled_charsmap)
        if any(normalizer.lookup(chr(c)) is not None for c in range(0x20, 0x7F)):
            raise ModelLoadError(f"{path}: its normalization table rewrites printable ASCII, which nmt_nfkc never does")

        # transformers' unigram vocabulary: every piece an ordinary one with its score, then the extra ids
        for piece in proto.pieces:
            piece.type = _Piece.NORMAL
        for n in reversed(range(extra_ids)):  # <extra_id_0> gets the highest id, as in T5
            raw_tokens[f"<extra_id_{n}>"] = len(proto.pieces)
            special_ids.add(len(proto.pieces))
            proto.pieces.add(piece=f"<extra_id_{n}>", score=0.0, type=_Piece.NORMAL)
        # sentencepiece needs one piece of type UNKNOWN that is not also an ordinary piece: a stand-in, mapped back
        size = len(proto.pieces)
        proto.pieces.add(piece="<unknown stand-in>", score=0.0, type=_Piece.UNKNOWN)
        proto.trainer_spec.unk_id, proto.trainer_spec.pad_id, proto.trainer_spec.eos_id = size, -1, -1
        proto.trainer_spec.bos_id = -1
        # words arrive normalized and with their "▁": sentencepiece must leave them as they are
        proto.normalizer_spec.Clear()
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = False
        try:
            processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except RuntimeError as e:
            raise ModelLoadError(f"sentencepiece cannot load {path} ({e}); copy spiece.model again") from e
        pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(raw_tokens, key=len, reverse=True)) + ")")
        return cls(processor, normalizer, size, raw_tokens, pattern, frozenset(special_ids), whole_stretches)

    def segments(self, stretch: str) -> list[str]:
        """Steps 2 and 3 of the module docstring: text between special tokens -> what sentencepiece segments."""
        text = re.sub(" +", "▁", self.normalizer(stretch).rstrip(_RUST_WHITESPACE))
        if not text:
            return []
        text = text if text.startswith("▁") else "▁" + text
        return [text] if self.whole_stretches else ["▁" + word for word in text[1:].split("▁")]


class MT5Tokenizer:
    """Text to mT5 ids and back, matching transformers' T5 tokenizer loaded from the same spiece.model."""

    def __init__(
        self,
        spiece: bytes,
        *,
        extra_ids: int = 100,
        model_max_length: int | None = None,
        path: Path = Path(SPIECE_NAME),  # where spiece came from, for error messages
    ):
        self._spiece = spiece  # the original bytes, for save_pretrained
        self.extra_ids = extra_ids
        self.model_max_length = model_max_length
        self._vocab = _Vocabulary.load(spiece, extra_ids, path)
        self.vocab_size = self._vocab.size
        missing = [token for token in (PAD, EOS, UNK) if token not in self._vocab.raw_tokens]
        if missing:
            raise ModelLoadError(f"{path} has no {', '.join(missing)}; mT5's has <pad>, </s>, <unk> at ids 0, 1, 2")
        self.pad_token_id, self.eos_token_id, self.unk_token_id = (self._vocab.raw_tokens[t] for t in (PAD, EOS, UNK))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None) -> MT5Tokenizer:
        """Loads spiece.model and tokenizer_config.json from a checkpoint directory, URI or hub id (at `revision`)."""
        from .checkpoint import read_json, resolve_checkpoint

        directory = resolve_checkpoint(source, revision=revision)
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
        extra_ids = config.get("extra_ids", 100)
        if not isinstance(extra_ids, int) or extra_ids < 0:
            raise ModelLoadError(f"{directory / CONFIG_NAME}: extra_ids must be a count >= 0, not {extra_ids!r}")
        _check_special_tokens(config, extra_ids, directory / CONFIG_NAME)
        special_map = read_json(directory, SPECIAL_TOKENS_MAP_NAME, required=False) or {}
        _check_special_tokens(special_map, extra_ids, directory / SPECIAL_TOKENS_MAP_NAME)
        return cls(spiece, extra_ids=extra_ids, model_max_length=config.get("model_max_length"), path=path)

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Writes spiece.model, tokenizer_config.json and special_tokens_map.json, loadable by AutoTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extras = [f"<extra_id_{n}>" for n in range(self.extra_ids)]
        special = {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": extras}
        # legacy=True is what mT5's own config implies by leaving it out; saying so stops transformers 4.x warning
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
        """input_ids and attention_mask for one text (flat lists) or a batch, as transformers' tokenizer(...).

        Truncation keeps </s> as the last id; padding is on the right, with pad_token_id.
        """
        single = isinstance(texts, str)
        ids = self._encode_batch([texts] if single else list(texts), add_special_tokens)
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            if limit is not None:
                ids = [self._truncate(seq, limit, add_special_tokens) for seq in ids]
        width = self._padded_width(ids, padding, max_length)
        mask = [[1] * len(seq) + [0] * (width - len(seq)) for seq in ids]
        ids = [seq + [self.pad_token_id] * (width - len(seq)) for seq in ids]  # right padding; none if width is 0
        if return_tensors == "pt":
            if len({len(seq) for seq in ids}) > 1:
                raise ValueError("the texts tokenize to different lengths; pass padding=True to return tensors")
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}; only None (lists) and 'pt' are supported")
        if single:
            return BatchEncoding(input_ids=ids[0], attention_mask=mask[0])
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encode_batch([text], add_special_tokens)[0]

    def _encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        vocab = self._vocab
        # per text: [stretch, special token, stretch, ...], each stretch as a list of segments; usually [[text]]
        texts_parts = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is a {type(text).__name__}, not a str")
            parts = vocab.raw_pattern.split(text)
            parts[::2] = [vocab.segments(stretch) for stretch in parts[::2]]
            texts_parts.append(parts)
        # one call for every segment of every text: sentencepiece encodes a list on all cores
        segments = [segment for parts in texts_parts for stretch in parts[::2] for segment in stretch]
        segmented = iter(vocab.processor.encode(segments))
        batch = []
        for parts in texts_parts:
            ids = []
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(vocab.raw_tokens[part])
                else:
                    for _ in part:
                        ids.extend(next(segmented))
            if vocab.size in ids:  # the stand-in unknown piece
                ids = [self.unk_token_id if i == vocab.size else i for i in ids]
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
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"cannot decode the negative id {min(ids)}; replace label padding (-100) by pad_token_id")
        # mT5's embedding has more rows than the tokenizer has ids (250112 vs 250100); transformers skips ids past
        # the vocabulary when decoding, and so do we
        skip = self._vocab.special_ids if skip_special_tokens else frozenset()
        tokens = self._vocab.processor.id_to_piece([i for i in ids if i < self.vocab_size and i not in skip])
        if not tokens:
            return ""
        # transformers' Metaspace decoder: every "▁" is a space, except in the first token, which loses them
        return tokens[0].replace("▁", "") + "".join(tokens[1:]).replace("▁", " ")

    def batch_decode(self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    # ------------------------------------------------------------------------------------------------------------
    # Tokens and ids

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.convert_tokens_to_ids([tokens])[0]
        ids = self._vocab.processor.piece_to_id(tokens)
        return [self.unk_token_id if i == self.vocab_size else i for i in ids]  # unknown tokens: the stand-in

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | None | list:
        if isinstance(ids, int):
            return self._vocab.processor.id_to_piece(ids) if 0 <= ids < self.vocab_size else None
        skip = self._vocab.special_ids if skip_special_tokens else frozenset()
        return [self.convert_ids_to_tokens(i) for i in ids if i not in skip]

    def __len__(self) -> int:
        return self.vocab_size


def _check_special_tokens(config: dict, extra_ids: int, path: Path) -> None:
    """Refuses special tokens other than T5's: transformers would add them to the vocabulary, and we do not."""
    for key, expected in (("pad_token", PAD), ("eos_token", EOS), ("unk_token", UNK)):
        if config.get(key) is not None and _content(config[key]) != expected:
            raise ModelLoadError(f"{path}: {key} is {config[key]!r}; this tokenizer supports mT5's {expected!r} only")
    for key in ("bos_token", "sep_token", "cls_token", "mask_token"):
        if config.get(key) is not None:
            raise ModelLoadError(f"{path}: {key} is set; mT5 has none, and this tokenizer supports none")
    extras = sorted(_content(token) for token in config.get("additional_special_tokens") or [])
    if extras and extras != sorted(f"<extra_id_{n}>" for n in range(extra_ids)):
        raise ModelLoadError(
            f"{path}: additional_special_tokens must be absent or <extra_id_0>..<extra_id_{extra_ids - 1}> "
            f"(extra_ids={extra_ids}); other added tokens are not supported"
        )


def _content(token: str | dict) -> str:
    return token["content"] if isinstance(token, dict) else token  # transformers saves AddedTokens as dicts
