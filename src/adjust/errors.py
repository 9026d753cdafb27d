"""One exception type for bad input: the CLI prints its message as one line and exits 2."""


class AdjustError(Exception):
    """A problem with what the user gave us (a path, a flag, a checkpoint), not a bug."""
