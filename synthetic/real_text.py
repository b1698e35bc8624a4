"""Real multilingual text from an installed package: Django's translations of its messages, in 99 languages.

Translators wrote them, in every script Django ships (Latin, Cyrillic, Arabic, Devanagari, Thai, CJK, ...), with
URLs, markup and placeholders among the words, as real documents have. Each catalog's header is text too. About
2.5 M characters in all (Django 5.2). The tokenizer tests and benchmarks/tokenizer_speed.py read it from here.
"""

from __future__ import annotations

import gettext
from pathlib import Path


def django_translations() -> dict[str, list[str]]:
    """language code -> its translated messages, languages sorted. Raises ImportError without django."""
    import django

    by_language: dict[str, list[str]] = {}
    for catalog in sorted(Path(django.__file__).parent.glob("**/locale/*/LC_MESSAGES/*.mo")):
        with catalog.open("rb") as f:
            messages = gettext.GNUTranslations(f)._catalog.values()  # msgid -> msgstr; gettext has no public list
        by_language.setdefault(catalog.parent.parent.name, []).extend(m for m in messages if m)
    return {language: messages for language, messages in sorted(by_language.items())}
