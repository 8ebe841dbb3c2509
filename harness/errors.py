"""The one exception type a user should ever see from the harness.

A `HarnessError` means "your input is wrong, here is why": the launcher prints its message
without a traceback and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """Bad input or an impossible request, with a message naming the cause."""


class TrainingAborted(HarnessError):
    """Training cannot usefully go on (e.g. too many non-finite steps in a row)."""

    exit_code = 3


class CollectiveTimeout(HarnessError):
    """A collective waited longer than --collective_timeout_s: some rank hung or died."""

    exit_code = 4
