"""Errors raised while reading a checkpoint; each message names the file or tensor at fault."""


class CheckpointError(ValueError):
    """A model directory cannot be loaded: missing file, unknown family, bad tensor, corrupt data."""
