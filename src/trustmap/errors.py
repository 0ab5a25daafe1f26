"""The errors trustmap raises on purpose: one documented hierarchy.

Every problem trustmap can name (a bad argument, a file it cannot read, a config value, a
model that does not fit the input) is raised as a subclass of :class:`TrustmapError`, with
a message that names the problem and, for files, the file (and the row, tag or field)::

    TrustmapError
    ├── InputError     bad arguments: shapes, NaN, unknown names, options, output folders
    │   └── OutputBusyError   another run holds the lock of the output folder
    ├── DataError      a file or dataset that cannot be read or makes no sense: corrupt or
    │                  truncated files, bad geometry, labels, masks, boxes, run-lengths
    ├── ConfigError    a value of a trust or training config
    └── ModelError     a model that cannot be loaded, does not fit the input (channels,
                       2D/3D), returns something other than logits, or has a layer a
                       method cannot handle

Each class is also a :class:`ValueError`, as the errors trustmap raised before these
classes existed, so ``except ValueError`` keeps working. Where trustmap raised
:class:`TypeError` or :class:`FileNotFoundError` for a problem, it raises a class that is
both (:class:`InputTypeError`, :class:`ModelTypeError`, :class:`MissingFileError`), so
``except TypeError`` and ``except FileNotFoundError`` keep working too.

The command line prints any of these as one line and exits with status 2. Any other
exception is a bug in trustmap (or in a library under it): the command line prints one
short line asking to report it and saves the traceback to a file.

>>> from trustmap.errors import TrustmapError
>>> try:  # doctest: +SKIP
...     load("scan.dcm")
... except TrustmapError as err:
...     print(err)  # "scan.dcm: tag RescaleSlope (0028,1053) is 'abc', not a number"
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "InputError",
    "InputTypeError",
    "MissingFileError",
    "ModelError",
    "ModelTypeError",
    "OutputBusyError",
    "TrustmapError",
]


class TrustmapError(Exception):
    """Base of every error trustmap raises on purpose; the message names the problem."""


class InputError(TrustmapError, ValueError):
    """A bad argument or input: a shape, NaN, an unknown name, an option, an output folder."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (also a :class:`TypeError`)."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder that does not exist (also a :class:`FileNotFoundError`)."""


class OutputBusyError(InputError):
    """Another trustmap run holds the lock of the output folder (see :mod:`trustmap.core.lock`)."""


class DataError(TrustmapError, ValueError):
    """A file or dataset that cannot be read or makes no sense; names the file (and row,
    tag or field)."""


class ConfigError(TrustmapError, ValueError):
    """A bad value in a trust or training config; names the key."""


class ModelError(TrustmapError, ValueError):
    """A model that cannot be loaded, does not fit the input or misbehaves."""


class ModelTypeError(ModelError, TypeError):
    """A model that returns or is the wrong type (also a :class:`TypeError`)."""
