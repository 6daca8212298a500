"""The one exception family for problems a user can cause (bad files, names, shapes, refused output)."""


class CheckpointError(Exception):
    """Its message is a single line naming the file or tensor and what was expected; CLIs print only that."""
