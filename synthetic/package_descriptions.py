"""A real multilingual document -> summary corpus: Debian's package descriptions and their translations.

Every Debian package has a one-line synopsis and a long description, written by its maintainer in English and
translated by people (the Debian Description Translation Project) into many languages. The long description is
the document, the synopsis its summary: short, abstractive, written by a person for exactly this purpose. apt
fetches them from Debian's package archive, one of the registries this project's machines reach:

    apt-get -o Acquire::Languages=en,de,es,fr,ja,ru,zh_CN update

(as root; the lists land in /var/lib/apt/lists as Translation-<language>.lz4). Bookworm holds about 63,000 English
descriptions, 21,000 French, 14,000 German, 6,600 Japanese, 3,400 Russian, 2,200 Spanish and 1,200 Chinese:
Latin, Cyrillic and CJK scripts, spaced and unspaced. Nothing is committed: `fetch()` runs that command when the
lists are missing, and `descriptions()` reads them.

The split is by package, never by row: a package's translations all land on the same side, so the held-out set
never holds a translation of a description the model was trained on.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

LISTS = Path("/var/lib/apt/lists")
LANGUAGES = ("en", "de", "es", "fr", "ja", "ru", "zh_CN")
APT_HELPER = "/usr/lib/apt/apt-helper"  # decompresses the lists (lz4) without a Python lz4 dependency


@dataclass(frozen=True)
class Description:
    language: str
    package: str
    document: str  # the long description, its paragraphs separated by newlines
    summary: str  # the synopsis


def fetch(languages: tuple[str, ...] = LANGUAGES) -> None:
    """Download the translation lists with apt (needs root and apt's sources), unless all are already there."""
    if all(_list_files(language) for language in languages):
        return
    subprocess.run(["apt-get", "-o", f"Acquire::Languages={','.join(languages)}", "update"], check=True)
    missing = [language for language in languages if not _list_files(language)]
    if missing:
        raise RuntimeError(f"apt fetched no Translation list for {missing}; is it a Debian system with deb sources?")


def descriptions(languages: tuple[str, ...] = LANGUAGES, min_chars: int = 80) -> list[Description]:
    """Every description in `languages` whose document has at least `min_chars` characters, in list order."""
    out = []
    for language in languages:
        files = _list_files(language)
        if not files:
            raise FileNotFoundError(f"no Translation-{language} list under {LISTS}: call fetch() first")
        seen = set()  # the security and updates suites repeat some packages of the main suite
        for path in files:
            text = subprocess.run([APT_HELPER, "cat-file", str(path)], check=True, capture_output=True).stdout
            for entry in _parse(text.decode("utf-8", errors="replace"), language):
                if entry.package not in seen and len(entry.document) >= min_chars and entry.summary:
                    seen.add(entry.package)
                    out.append(entry)
    return out


def held_out(package: str, fraction: float = 0.1) -> bool:
    """Whether the package belongs to the held-out split: a stable hash of its name, the same in every language."""
    return int.from_bytes(hashlib.blake2b(package.encode(), digest_size=8).digest(), "big") / 2**64 < fraction


def _list_files(language: str) -> list[Path]:
    tag = language.replace("_", "%5f")
    return sorted(LISTS.glob(f"*_i18n_Translation-{tag}*"))


def _parse(text: str, language: str) -> list[Description]:
    """Deb822 stanzas: `Package:`, then `Description-<language>:` with the synopsis and indented lines after it."""
    out = []
    field = f"Description-{language}:"
    for stanza in text.split("\n\n"):
        package, synopsis, lines = None, None, []
        for line in stanza.split("\n"):
            if line.startswith("Package:"):
                package = line.split(":", 1)[1].strip()
            elif line.startswith(field):
                synopsis = line[len(field) :].strip()
            elif synopsis is not None and line.startswith(" "):
                lines.append(line[1:])
        if package and synopsis:
            out.append(Description(language, package, _document(lines), synopsis))
    return out


def _document(lines: list[str]) -> str:
    """Debian's description markup: a line of " ." separates paragraphs; other lines of a paragraph join."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip() == ".":
            paragraphs.append(current)
            current = []
        else:
            current.append(line.strip())
    paragraphs.append(current)
    return "\n".join(" ".join(p) for p in paragraphs if p)
