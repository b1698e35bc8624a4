"""benchmarks/run.py with one more engine: ours int8-dynamic, continuous, as it was before issue 15's beam-step
and int8-head changes. It takes turns with the others in the same process, so that a loaded machine slows
the two versions alike and the ratio to CTranslate2 int8 is fair. Arguments as run.py's, e.g.

    python benchmarks/before_after_issue15.py --engines ct2-int8,ours-int8-dynamic-continuous-before,\\
        ours-int8-dynamic-continuous --decoding beam4 --docs 32 --repeats 2 --threads 1 --no-memory

"Before" is today's code with the three changes undone: torch.topk for model.logits.top_k, logsumexp over
all rows at once rather than in cache-sized blocks, and the int8 head prepacked for fbgemm (torch's "x86"
engine) rather than oneDNN (model/packed.py).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import model.decode  # noqa: E402
import model.logits  # noqa: E402
from benchmarks import engines, run  # noqa: E402
from model.packed import repack_dynamic_int8  # noqa: E402

BEFORE = "ours-int8-dynamic-continuous-before"


def logsumexp_all_rows(x, buffers):
    top = x.amax(-1, keepdim=True)
    shifted = torch.sub(x, top, out=buffers.get("shifted", x.shape[0], x, x.shape[1]))
    return shifted.clamp_(min=model.decode.EXP_FLOOR).exp_().sum(-1, keepdim=True).log_() + top


@contextlib.contextmanager
def as_before():
    chunked, blocked = model.logits.top_k, model.decode.logsumexp
    model.decode.top_k = model.logits.top_k = torch.topk
    model.decode.logsumexp = logsumexp_all_rows
    try:
        yield
    finally:
        model.decode.top_k = model.logits.top_k = chunked
        model.decode.logsumexp = blocked


class Before(engines.ContinuousEngine):
    def __init__(self, ctx):
        super().__init__(ctx, engines.ours(ctx, quantization="int8-dynamic").model)
        repack_dynamic_int8(self.model.lm_head, "x86")  # fbgemm's kernel, as before

    def run(self, docs, decoding):
        with as_before():
            return super().run(docs, decoding)


if __name__ == "__main__":
    engines.ENGINES[BEFORE] = (("cpu",), lambda ctx, shared: Before(ctx))
    run.main()
