"""The one exception type a user should ever see from the harness.

A `HarnessError` means "your input is wrong, here is why": the launcher prints its message
without a traceback and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """Bad input or an impossible request, with a message naming the cause."""
