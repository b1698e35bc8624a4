"""mT5's tokenizer: spiece.model plus T5's conventions, giving the same ids and text as transformers.

transformers' T5 tokenizer (T5TokenizerFast in 4.x) runs `tokenizers` components over the text. We run the same
steps, reading spiece.model with sentencepiece's protobuf:

1. Special tokens (<pad>, </s>, <unk>, <extra_id_N>) are matched on the raw text and become their ids.
2. Each stretch in between is normalized by spiece.model's precompiled nmt_nfkc table, grapheme by grapheme.
3. Trailing whitespace is stripped, each run of spaces becomes one "▁", and a "▁" goes in front.
4. The text is split into words, each led by its "▁", and each word is segmented by a unigram model over
   spiece.model's pieces plus the extra ids (`_Unigram`, the Viterbi of `tokenizers`' Unigram, in float64), and
   </s> is appended.

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
  pieces; our segmentation uses transformers' list.
- sentencepiece adds scores in float32 along a whole stretch of text, `tokenizers` in float64 word by word. Two
  segmentations of equal score ("ww|w" and "w|ww" in "www") are then told apart differently once the float32 sums
  round: 12 of 226,627 documents of a real 20-language corpus got other ids. So we segment ourselves, as
  `tokenizers` does (see `_Unigram`).
- sentencepiece renders <unk> as " ⁇ " when decoding. transformers joins the token strings and turns "▁" into
  spaces; so do we.
Known differences that remain:
- Python 3.11 knows Unicode 14; combining marks assigned since then do not join graphemes here.
- transformers 5.x splits words on all whitespace, so U+0085 inside text is a space there, and an unknown
  character in 4.x and in sentencepiece. We follow 4.x, the version this project tests against.
Reading the model uses sentencepiece_model_pb2, which needs protobuf (ray depends on it).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sentencepiece import sentencepiece_model_pb2

if TYPE_CHECKING:  # torch is imported where a tensor is made: a process that only tokenizes never loads it
    import torch

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


class _Unigram:
    """Words to ids: the best segmentation under a unigram model, found as `tokenizers`' Unigram finds it.

    transformers' ids are `tokenizers`' (its Unigram model's `encode_optimized`, the same Viterbi as
    sentencepiece's `EncodeOptimized`), and matching them on every text takes the same arithmetic and the same
    order of comparisons, not only the same optimum:
    - scores are float64 (the float32 scores of spiece.model, widened), and a path's score is summed from the
      word's first character, piece by piece; sentencepiece sums in float32, and along a whole stretch of text;
    - the start positions are visited in order, and a piece ending at position e replaces the best path to e
      only if its score is strictly higher, so between paths of equal score the one whose last piece starts
      first wins ("www" is "w|ww", not "ww|w", when both score the same);
    - a character that starts no piece of one character is an unknown piece of score (lowest score - 10), and a
      run of unknown pieces is one token, whose id is that of the piece spelling the run if there is one.
    Each word's ids are cached, as `tokenizers` caches them: real text repeats its words.
    """

    _UNKNOWN_PENALTY = 10.0
    _CACHE_SIZE = 100_000  # words; the cache is emptied when full
    _CACHED_LENGTH = 256  # longer words (unspaced text) seldom recur

    def __init__(self, pieces: list[tuple[str, float]], unk_id: int):
        self._set_up([piece for piece, _ in pieces], [score for _, score in pieces], unk_id)

    @classmethod
    def from_columns(cls, pieces: list[str], scores: list[float], unk_id: int) -> _Unigram:
        """The same as _Unigram(list(zip(pieces, scores)), unk_id), without a tuple per piece."""
        unigram = cls.__new__(cls)
        unigram._set_up(pieces, scores, unk_id)
        return unigram

    def _set_up(self, pieces: list[str], scores: list[float], unk_id: int) -> None:
        if not _all_finite(scores):
            raise ValueError("every piece's score must be finite")
        self._pieces, self._scores = pieces, scores
        self._unk_id = unk_id
        self._unk_score = min(scores) - self._UNKNOWN_PENALTY
        self._prefixes: dict[str, int] | None = None  # built by the first word segmented
        self._cache: dict[str, list[int]] = {}

    def _build_prefixes(self) -> dict[str, int]:
        """Every piece -> its id, and every other prefix of a piece -> -1.

        Segmenting extends a piece from each position of a word only while it is still a prefix of some piece, so
        most positions cost one or two lookups (a trie walk, the trie being one dict), where trying every length a
        piece has costs many. Built on first use, in bulk (ids, not (id, score) tuples, 1.5-2 times as slow to
        make): loading a tokenizer only to check it (the driver) never pays for it.
        """
        pieces = self._pieces
        prefixes, longer, end = {}, pieces, 1
        while longer := [piece for piece in longer if len(piece) > end]:  # length by length: the fastest we found
            prefixes.update(dict.fromkeys([piece[:end] for piece in longer], -1))
            end += 1
        prefixes.update(zip(pieces, range(len(pieces))))  # a later duplicate wins
        self._prefixes = prefixes  # whole or not at all: threads that segment at once each build an equal one
        return prefixes

    def __getstate__(self) -> dict:
        # Ray and the tokenize pool pickle the tokenizer for each worker: leave out what the worker rebuilds
        return {**self.__dict__, "_cache": {}, "_prefixes": None}

    def __call__(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = self._segment(word)
            if len(word) < self._CACHED_LENGTH:
                if len(self._cache) >= self._CACHE_SIZE:
                    self._cache.clear()
                self._cache[word] = ids
        return ids

    def _segment(self, word: str) -> list[int]:
        prefixes = self._prefixes if self._prefixes is not None else self._build_prefixes()
        get, scores, unk_id, unk_score = prefixes.get, self._scores, self._unk_id, self._unk_score
        n = len(word)
        # the score of the best path found so far from the word's start to each position. `tokenizers` takes the
        # first path to a position whatever its score; starting from -inf does the same, scores being finite.
        best = [0.0] + [-math.inf] * n
        starts = [0] * (n + 1)  # where that path's last piece starts
        ids = [0] * (n + 1)  # and that piece's id
        for start in range(n):
            here, after = best[start], start + 1
            # the piece of one character here, or else the unknown piece: one candidate for the next position.
            # found: the id of a piece, -1 for a prefix of pieces only, -2 for neither.
            found = get(word[start], -2)
            if found >= 0:
                score = scores[found] + here
                if score > best[after]:  # strictly higher: of two paths of equal score, the earlier start stays
                    best[after] = score
                    starts[after] = start
                    ids[after] = found
            else:
                score = unk_score + here
                if score > best[after]:
                    best[after] = score
                    starts[after] = start
                    ids[after] = unk_id
                if found == -2:
                    continue
            end = after + 1
            while end <= n:  # longer pieces, for as long as word[start:end] begins one
                found = get(word[start:end], -2)
                if found == -2:
                    break
                if found >= 0:
                    score = scores[found] + here
                    if score > best[end]:
                        best[end] = score
                        starts[end] = start
                        ids[end] = found
                end += 1
        # back from the end, joining each run of unknown pieces into one token
        tokens, end = [], n
        while end > 0:
            start = starts[end]
            if ids[end] == unk_id:
                while start > 0 and ids[start] == unk_id:
                    start = starts[start]
                found = get(word[start:end], -1)
                tokens.append(found if found >= 0 else unk_id)
            else:
                tokens.append(ids[end])
            end = start
        return tokens[::-1]


@dataclass(frozen=True)
class _Vocabulary:
    """What encoding needs from spiece.model, laid out as transformers lays it out."""

    pieces: list[str]  # transformers' vocabulary: spiece.model's pieces, then <extra_id_99> .. <extra_id_0>
    unigram: _Unigram
    normalizer: _Normalizer
    raw_tokens: dict[str, int]  # matched on the raw text, before normalization
    raw_pattern: re.Pattern  # those tokens, longest first, as one capturing group
    special_ids: frozenset[int]  # what skip_special_tokens drops

    @functools.cached_property
    def piece_ids(self) -> dict[str, int]:
        """Each piece's id, for convert_tokens_to_ids; a later duplicate wins. Made on first use."""
        return dict(zip(self.pieces, range(len(self.pieces))))

    @classmethod
    def load(cls, spiece: bytes, extra_ids: int, path: Path) -> _Vocabulary:
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(spiece)
        except Exception as e:  # protobuf's DecodeError, or whatever else a corrupt file provokes
            raise ModelLoadError(f"{path} is not a sentencepiece model ({e}); copy spiece.model again") from e
        if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM or not proto.pieces:
            raise ModelLoadError(f"{path} is not a unigram sentencepiece model, as mT5's spiece.model is")
        # one pass per field: protobuf makes a Python object per piece and field read, the bulk of loading's time
        entries = proto.pieces
        pieces = [p.piece for p in entries]
        scores = [p.score for p in entries]
        types = [p.type for p in entries]
        # transformers' converter matches control and user-defined pieces on the raw text; only control is special
        special_types = (_Piece.CONTROL, _Piece.UNKNOWN)
        unusual = [i for i, kind in enumerate(types) if kind != _Piece.NORMAL]  # a few hundred at most
        raw_tokens = {pieces[i]: i for i in unusual if types[i] in (*special_types, _Piece.USER_DEFINED)}
        special_ids = {i for i in unusual if types[i] in special_types}
        if not proto.normalizer_spec.precompiled_charsmap:
            raise ModelLoadError(f"{path} has no normalization table; mT5's spiece.model normalizes with nmt_nfkc")
        normalizer = _Normalizer(proto.normalizer_spec.precompiled_charsmap)
        if any(normalizer.lookup(chr(c)) is not None for c in range(0x20, 0x7F)):
            raise ModelLoadError(f"{path}: its normalization table rewrites printable ASCII, which nmt_nfkc never does")
        if not 0 <= proto.trainer_spec.unk_id < len(proto.pieces):
            raise ModelLoadError(f"{path}: its unk_id {proto.trainer_spec.unk_id} is not a piece's id")

        # transformers' unigram vocabulary: every piece an ordinary one with its score, then the extra ids
        if not _all_finite(scores):
            raise ModelLoadError(f"{path} has pieces of score inf or nan; copy spiece.model again")
        for n in reversed(range(extra_ids)):  # <extra_id_0> gets the highest id, as in T5
            raw_tokens[f"<extra_id_{n}>"] = len(pieces)
            special_ids.add(len(pieces))
            pieces.append(f"<extra_id_{n}>")
            scores.append(0.0)
        unigram = _Unigram.from_columns(pieces, scores, proto.trainer_spec.unk_id)
        pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(raw_tokens, key=len, reverse=True)) + ")")
        return cls(pieces, unigram, normalizer, raw_tokens, pattern, frozenset(special_ids))

    def words(self, stretch: str) -> list[str]:
        """Steps 2 and 3 of the module docstring: text between special tokens -> its words, each led by "▁"."""
        text = re.sub(" +", "▁", self.normalizer(stretch).rstrip(_RUST_WHITESPACE))
        if not text:
            return []
        text = text if text.startswith("▁") else "▁" + text
        return ["▁" + word for word in text[1:].split("▁")]


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
        self.vocab_size = len(self._vocab.pieces)
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
            import torch

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
        batch = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is a {type(text).__name__}, not a str")
            ids = []
            # [stretch, special token, stretch, ...]; usually [text]
            for k, part in enumerate(vocab.raw_pattern.split(text)):
                if k % 2:
                    ids.append(vocab.raw_tokens[part])
                else:
                    for word in vocab.words(part):
                        ids += vocab.unigram(word)
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
        tokens = [self._vocab.pieces[i] for i in ids if i < self.vocab_size and i not in skip]
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
        return [self._vocab.piece_ids.get(token, self.unk_token_id) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | None | list:
        if isinstance(ids, int):
            return self._vocab.pieces[ids] if 0 <= ids < self.vocab_size else None
        skip = self._vocab.special_ids if skip_special_tokens else frozenset()
        return [self.convert_ids_to_tokens(i) for i in ids if i not in skip]

    def __len__(self) -> int:
        return self.vocab_size


def _all_finite(scores: tuple[float, ...] | list[float]) -> bool:
    """Whether no score is inf or nan, summed in C: a sum of finite floats is finite unless it overflows, which
    scores widened from float32 (at most 3.4e38 each) cannot, and then each score is checked alone."""
    return math.isfinite(sum(scores)) or all(math.isfinite(score) for score in scores)


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
