"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (file, model, data, option), reported in one line.

    The CLI catches it, prints ``fastgraph: error: <message>`` to stderr and exits with
    code 2, never a traceback. The message names the file or option at fault and what
    to do about it.
    """


class DataError(UserError):
    """A missing, truncated or corrupt CIFAR-10 file or archive (the message names it)."""


class ModelError(UserError):
    """A model file that cannot be loaded, constructed or traced (the message names the line)."""
