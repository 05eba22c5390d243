"""The error of every checkpoint reader and writer (the bottom of the checkpoint package)."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used: names the file and says what to do."""


__all__ = ["CheckpointError"]
