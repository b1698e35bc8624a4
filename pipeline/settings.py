"""SummarizeSettings: what a summarization run does, parsed once from the flags and passed inward."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.quantization_methods import METHODS

# auto: the fastest setting that fits the replica's share of GPU memory, float32 without quantization on CPU
# (pipeline/fit.py); the driver resolves it once, before replicas start, and the manifest records the choice.
QUANTIZATIONS = (*METHODS, "auto")

DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(frozen=True)
class SummarizeSettings:
    model: str
    # A hub id's branch, tag or commit. The driver resolves it to a commit once, and every replica loads that
    # commit, so all load the same bytes even if the branch moves during the run.
    revision: str | None = None
    text_column: str = "text"
    id_column: str | None = "id"
    prefix: str = ""
    dtype: str = "auto"  # auto: model.inference.inference_dtype (bfloat16 on a GPU with it, float16 on one without)
    quantization: str = "auto"
    # A UTF-8 text file (local or fsspec URI) in the languages summarized: summaries use only its pieces.
    output_vocabulary: str | None = None
    max_input_tokens: int = 512
    max_new_tokens: int = 84
    num_beams: int = 4
    # None: take the checkpoint's generation_config.json value (XL-Sum's is 2 and 0.6).
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    # Documents decoded at once (continuous batching refills finished ones): at most batch_size, and
    # documents * longest input <= max_batch_tokens.
    batch_size: int = 32
    max_batch_tokens: int = 16384
    rows_per_unit: int = 20000
    # Decode through the compiled step (model/compiled_decode.py): CUDA graphs on a GPU, where the eager step
    # is launch-bound. The same tokens; each replica compiles first (tens of seconds per batch shape).
    compile_decode: bool = False

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization {self.quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.quantization == "int8-dynamic" and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"--quantization int8-dynamic computes in float32 on CPU: use --dtype float32 or auto, not {self.dtype}"
            )
        if self.quantization == "int8-dynamic" and self.compile_decode:
            raise ValueError(
                "--compile-decode does not run with --quantization int8-dynamic: torch.compile cannot trace torch's "
                "dynamic int8 layers; leave out one of the two (int8-dynamic is the fast CPU path on its own)"
            )
        for name in (
            "max_input_tokens",
            "max_new_tokens",
            "num_beams",
            "batch_size",
            "max_batch_tokens",
            "rows_per_unit",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_tokens < self.max_input_tokens:
            raise ValueError(
                f"--max-batch-tokens ({self.max_batch_tokens}) must be at least --max-input-tokens "
                f"({self.max_input_tokens}), or a long document could never be batched"
            )

    def generation(self) -> dict:
        """Settings for model.generate; unset ones fall back to the checkpoint's generation_config.json."""
        settings = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        if self.no_repeat_ngram_size is not None:
            settings["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.length_penalty is not None:
            settings["length_penalty"] = self.length_penalty
        if self.compile_decode:
            settings["compile"] = True
        return settings

    def output_affecting(self) -> dict:
        """The settings that change what is written: a rerun with other values must not mix outputs.

        Batch sizes and compile_decode are left out on purpose: they change speed, not which rows land where. So is the
        revision: the model is compared by content (the driver's fingerprint), so a new commit that leaves
        the weights as they were is the same model. The output vocabulary is here by path; the driver adds a
        fingerprint of its content (pipeline/vocabulary.py).
        """
        fields = dataclasses.asdict(self)
        for name in ("batch_size", "max_batch_tokens", "compile_decode", "revision"):
            del fields[name]
        return fields
