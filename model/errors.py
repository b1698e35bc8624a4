"""One exception type per family, so the job's top level can set the exit status from it."""


class ModelLoadError(Exception):
    """A checkpoint (config, weights, tokenizer) is missing, unreadable, or does not fit together.

    The message names the file and says what to do.
    """


class ConfigError(ModelLoadError):
    """config.json is inconsistent or names something this implementation does not support."""
