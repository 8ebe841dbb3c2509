"""The exceptions a user should ever see from the harness, and the exit status each maps to.

A `HarnessError` means "your input is wrong, here is why": the launcher (`harness.cli`) prints its
message without a traceback and exits with its `exit_code` (2 unless a subclass says otherwise).
`RequeueRequested` is not a failure at all. Anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """Bad input or an impossible request, with a message naming the cause."""

    exit_code = 2


class TrainingAborted(HarnessError):
    """Training cannot usefully go on (e.g. too many non-finite steps in a row)."""

    exit_code = 3


class NonFiniteWeights(TrainingAborted):
    """The weights hold NaN or Inf: neither a checkpoint nor final/ or best/ is written from them.

    Exit status 3, like any aborted training: nothing usable came out of the last steps.
    """


class CollectiveTimeout(HarnessError):
    """A collective waited longer than --collective_timeout_s: some rank hung or died."""

    exit_code = 4


class RequeueRequested(Exception):
    """A signal asked the run to stop; the loop saved a checkpoint at a step boundary first.

    The launcher exits with status 75, EX_TEMPFAIL from sysexits.h ("a temporary failure, the
    caller is invited to retry"): the Slurm wrapper requeues the job, which resumes with --resume auto.
    """

    exit_code = 75
