"""before_after_issue15.py runs an engine on the `model` package of a git revision, beside today's in one process."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.before_after_issue15 import Code


def test_a_revisions_model_package_is_swapped_in_for_its_engine_and_out_after():
    import model.config as today

    code = Code("HEAD")
    with code.swapped_in():
        import model.config as then

        assert then is not today and Path(then.__file__).is_relative_to(code.init.parent)
    assert sys.modules["model.config"] is today and sys.modules["model"].__file__ == str(
        Path(today.__file__).parent / "__init__.py"
    )
    with code.swapped_in():  # its modules are kept while swapped out: imported once
        assert sys.modules["model.config"] is then
