"""The exceptions for problems a user can cause; the CLIs print their one-line message and exit with status 1."""


def listed(names, most: int = 4) -> str:
    """The first `most` of `names` for a message, and how many more there are."""
    names = list(names)
    return ", ".join(names[:most]) + (f", … (+{len(names) - most})" if len(names) > most else "")


def sized(nbytes: int) -> str:
    """A byte count for a message, in decimal units as disks are sold (kB, MB, GB), three digits at least."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.{2 if nbytes < 10 * scale else 1}f} {unit}"
    return f"{nbytes} bytes"


class UserError(Exception):
    """A bad value, option or setting (a usage or training-config error): a single line saying what is wrong."""


class CheckpointError(UserError):
    """A file's content is wrong (bad weights, names, shapes, a malformed config or index) or its output is refused:
    a single line naming the file or tensor and what was expected."""
