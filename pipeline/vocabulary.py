"""--output-vocabulary: the sample text whose pieces are the only ones summaries may use.

The driver reads it before any work (a missing or unreadable file fails the job there, naming the flag)
and puts a fingerprint of its content in the manifest, so that a rerun with another sample behind the
same path is refused like any other change of settings. Each replica reads it again when it loads its
model and restricts the output head to its pieces (model/vocabulary.py).
"""

from __future__ import annotations

import hashlib

from model.storage import open_filesystem, redact_url, scrub, url_secrets

from .errors import InputError


def read_sample(url: str, storage_options: dict | None = None) -> str:
    """The file's text, read through fsspec like the inputs; InputError naming the flag otherwise."""
    shown = redact_url(url)
    fs, path = open_filesystem(url, storage_options, error=InputError)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise InputError(
            f"--output-vocabulary {shown}: no such file; pass a UTF-8 text file in the languages you summarize"
        ) from None
    except UnicodeDecodeError as e:
        raise InputError(f"--output-vocabulary {shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(
            f"--output-vocabulary {shown}: cannot read it: {type(e).__name__}: {scrub(str(e), url_secrets(url))}"
        ) from None
    if not text.strip():
        raise InputError(f"--output-vocabulary {shown} is empty: summaries could use no piece but </s>")
    return text


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def kept_ids(tokenizer, text: str) -> set[int]:
    """The pieces of the sample, tokenized a line at a time (a file may hold one document per line)."""
    from model.vocabulary import kept_ids_from_text  # torch: the replica's, not the driver's (fingerprint)

    return kept_ids_from_text(tokenizer, (line for line in text.splitlines() if line.strip()))
