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
  hide the requeue request from the batch script. It first ignores SIGTERM and waits a few
  seconds: the first node to exit 75 makes srun (--kill-on-bad-exit) terminate the other nodes'
  tasks, whose ranks are exiting 75 at the same moment (they passed a common barrier) but whose
  agents notice it up to one monitor interval later. Killed, they would report 143, and srun
  returns the highest task status; lingering, every node reports 75 and srun returns 75.
  Slurm's SIGKILL follows only after KillWait (30 s by default), well after the linger. A node
  slower than that reports 143 and srun returns 143: the batch script then goes by the requeue
  marker that rank 0 wrote, not by this status.

And one addition for the log: with `--tee` torchrun copies every line a rank prints into the job
log; each line is prefixed with this node's Slurm name and the rank's global rank
(`[node3 rank 17]: ...`) instead of torchrun's default `[default0]:` (role and local rank), which
is the same on every node.
"""

import os
import signal
import socket
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

EXIT_REQUEUE = 75  # harness.errors.RequeueRequested.exit_code; not imported so the agent needs no harness import
LINGER_S = 5.0  # far above the skew between nodes leaving the harness's last barrier


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    # torchrun substitutes ${rank} itself (string.Template), for each rank it starts.
    os.environ.setdefault("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", f"[{node} rank ${{rank}}]: ")
    try:
        main()
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes != {EXIT_REQUEUE}:
            sys.exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"[{node}] torchrun: every failed rank exited {EXIT_REQUEUE} (checkpoint saved); exiting {EXIT_REQUEUE} "
              f"in {LINGER_S:.0f}s", file=sys.stderr, flush=True)
        time.sleep(LINGER_S)
        sys.exit(EXIT_REQUEUE)  # SIGTERM stays ignored through interpreter shutdown (SIG_IGN is kept)
