"""The project's error type for problems a user fixes: bad flags, bad input files, a cluster too small.

Jobs print such an error as one line and exit with status 2 (``jobs._runtime.run_job``); any
other exception is a bug and keeps its traceback (exit status 1). Raise :class:`ConfigError`
(also a ``ValueError``) for a setting or input that cannot work, or a subclass of
:class:`MltrError` for a missing or malformed dataset (``pipeline.dataset.DatasetNotFound``, the
readers' ``LayoutError`` and ``AnnotationError``).
"""

from __future__ import annotations


class MltrError(Exception):
    """A problem the user fixes by changing input or flags; the message says what and where."""

    def __str__(self) -> str:
        # One line, whatever the base class (KeyError would print its message quoted).
        return " ".join(str(self.args[0]).split("\n")) if len(self.args) == 1 else super().__str__()


class ConfigError(MltrError, ValueError):
    """A setting, flag or input file that cannot work (a ``ValueError`` too, for library callers)."""


class TrainingDiverged(MltrError, FloatingPointError):
    """The training loss stopped being a number: the learning rate (or the lack of clipping) is the
    user's to change. Raised by a Train worker; :func:`mltr.trainer.fit` raises it on the driver."""
