"""The exceptions for problems a user can cause; the CLIs print their one-line message and exit with status 1."""


def listed(names, most: int = 4) -> str:
    """The first `most` of `names` for a message, and how many more there are."""
    names = list(names)
    return ", ".join(names[:most]) + (f", … (+{len(names) - most})" if len(names) > most else "")


class UserError(Exception):
    """A bad value, option or setting (a usage or training-config error): a single line saying what is wrong."""


class CheckpointError(UserError):
    """A file's content is wrong (bad weights, names, shapes, a malformed config or index) or its output is refused:
    a single line naming the file or tensor and what was expected."""
