"""Errors a user can cause and fix; the CLI prints their message on one line and exits 2.

Anything else raised inside smolconvert is a bug in smolconvert (exit 1, traceback with --debug).
Messages say what was wrong, what was found, what was expected and how to fix it.
"""

from __future__ import annotations


class SmolconvertError(Exception):
    """Base class of every error caused by input, environment or configuration."""


class ConfigError(SmolconvertError):
    """A config file or option is malformed or contradicts itself."""


class UnsupportedError(SmolconvertError):
    """The input is valid but uses something smolconvert does not convert correctly (yet)."""


class CorruptFileError(SmolconvertError):
    """A file is truncated, inconsistent or not the format it claims to be."""


class MissingDependencyError(SmolconvertError):
    """An optional package needed for this operation is not installed."""


class ValidationError(SmolconvertError):
    """An artifact failed a quality or consistency check."""


class ConfigWarning(UserWarning):
    """Something in the input was ignored that the user should know about (the CLI prints it as
    one `warning:` line)."""
