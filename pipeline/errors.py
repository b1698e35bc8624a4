"""One exception type per family, caught at the job's top level, where the exit status (2) is set."""


class InputError(Exception):
    """The input makes the whole job wrong (no shards, a missing or mistyped column): fail before any work.

    The message names the shard and the column, and says which flag to pass.
    """


class OutputError(Exception):
    """The output location cannot be used as asked (written with other settings, would overwrite inputs)."""


class PlacementError(Exception):
    """The replicas cannot run as asked: a setting the device cannot run, or no replica placed in time.

    The message says what each replica asked for, what the cluster has, and which flag to change.
    """
