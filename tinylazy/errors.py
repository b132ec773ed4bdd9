"""The one base of the errors a file raises when it cannot be used.

``io.WeightsError`` (weights, and ``convert.ConvertError`` for checkpoints), ``lazy.GatesError``
and ``trace.TraceError`` derive from ``FileError``, a ``ValueError``: callers that only care
that an input was bad catch ``FileError`` (the CLI reports it as bad input, exit 2) without
importing the modules that raise it.
"""


class FileError(ValueError):
    """An input file that cannot be used; the message names the file and the reason."""
