"""The errors tokenreduce raises on purpose: bad input the caller can fix.

They subclass ``ValueError`` / ``TypeError`` / ``ImportError`` so that existing ``except`` clauses keep
working, and share one base, :class:`TokenReduceError`, which is all the command line reports as "bad input"
(exit 2, one line); any other exception is a bug and keeps its traceback.

>>> issubclass(InputError, ValueError) and issubclass(InputError, TokenReduceError)
True
"""

from __future__ import annotations


class TokenReduceError(Exception):
    """Base of every error tokenreduce raises about its input."""


class InputError(TokenReduceError, ValueError):
    """A value the caller can fix: an unknown method, an option, a schedule, a size, a file, an image."""


class InputTypeError(TokenReduceError, TypeError):
    """A model, module or argument of a kind tokenreduce does not handle."""


class MissingExtraError(TokenReduceError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str) -> None:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install "tokenreduce[extra]"``.

    >>> require("math", "viz")
    """
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{module} is not installed; it comes with the {extra!r} extra: "
                                f"pip install \"tokenreduce[{extra}]\"") from err
