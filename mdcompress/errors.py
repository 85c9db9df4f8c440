"""The user errors: one base class, so that a command line catches them all and reports them in one
line (what is wrong, the value received, how to fix it), with exit status 2 and no traceback."""


class UserError(ValueError):
    """A user-facing problem (one-line message): the input was wrong, not the program."""


class ConfigError(UserError):
    """A user-facing problem with the configuration or the inputs it names (one-line message)."""


class DataError(UserError):
    """A user-facing problem with the data a config names (one-line message)."""


class DecompositionError(UserError):
    """A user-facing problem with the layers or ranks asked for (one-line message)."""


class OutputError(UserError):
    """A user-facing problem with a folder the run writes (one-line message)."""


class ExportError(UserError):
    """A user-facing problem with what is exported or where (one-line message)."""


class TranslateError(UserError):
    """A user-facing problem with the model folder or the options (one-line message)."""
