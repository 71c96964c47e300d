"""The one base class of every failure a user can fix, and the few kinds the CLI reports in one line.

Every error the library raises on purpose for bad input, a missing or corrupt file, a refused overwrite or an
unsupported combination derives from :class:`Gemma3QATError`. The CLI prints its first line and exits 1;
anything else is a bug and keeps its traceback (see ``gemma3_qat.cli.main``). The kinds also derive from the
matching built-in exception, so ``except ValueError`` / ``except FileNotFoundError`` in user code keeps working.
"""

from __future__ import annotations


class Gemma3QATError(Exception):
    """A failure the user can fix; its message names the problem and the fix in its first line."""


class InputError(Gemma3QATError, ValueError):
    """A bad value, option combination, file content or model that the operation cannot use."""


class MissingFileError(Gemma3QATError, FileNotFoundError):
    """A file or directory that should exist does not."""


class OutputExistsError(Gemma3QATError, FileExistsError):
    """An output already exists and ``--force`` was not given."""


class CorruptFileError(InputError):
    """A file that is truncated or whose bytes do not match what its header or manifest says."""
