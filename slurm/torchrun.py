"""torchrun for one Slurm task per node; slurm/train.sbatch starts it, with torchrun's own flags:

    srun ... python slurm/torchrun.py --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d ... launch/train.py ...

Two differences from plain `torchrun`, both for preemption:
- SIGUSR1 is ignored by this agent process. Slurm sends the pre-timeout signal (`--signal=USR1@N`)
  to every process of the step; its default action would kill the agent, which would then take
  the ranks down before they save. The ranks inherit the "ignore" disposition until the harness
  installs its own SIGUSR1 handler (harness/checkpoint.py StopRequest), so a signal during model
  loading does not kill them either.
- When every failed rank of this node exited 75 (the harness's "saved, please requeue"), this
  process exits 75 too; torchrun itself reports any rank failure as exit status 1, which would
  hide the requeue request from the batch script.
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

EXIT_REQUEUE = 75  # harness.checkpoint.EXIT_REQUEUE; not imported so the agent needs no harness import


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        main()
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        sys.exit(EXIT_REQUEUE if codes == {EXIT_REQUEUE} else 1)
