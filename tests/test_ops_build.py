"""DeepSpeed's JIT-compiled ops: a build lock that holds a run up is named, not waited on in silence.

A killed build leaves `<extensions folder>/<op>/lock`, and every later run then sleeps in torch's
FileBaton.wait forever. These tests start the real `engine.init_distributed` (which builds the CPU
communication op) against an extensions folder holding such a lock, with the watchdog's delay
shortened, and read what the process says while it waits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import LAUNCHER_ENV_VARS, ROOT


def wait_for_warning(tmp_path, hold: bool) -> tuple[str, object, bool]:
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    holder = open(lock) if hold else None  # a live build keeps its lock file open
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), DS_ACCELERATOR="cpu")
    code = "from harness import engine; engine.OPS_BUILD_WARN_AFTER_S = 1; engine.init_distributed()"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # never blocks the test
    reader.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            warned = [line for line in lines if line.startswith("warning: DeepSpeed has waited")]
            if warned:
                return warned[0], lock, proc.poll() is None
            time.sleep(0.2)
        pytest.fail(f"no warning within 120 s (exit status {proc.poll()}):\n{''.join(lines)[-3000:]}")
    finally:
        proc.kill()
        proc.wait()
        if holder:
            holder.close()


def test_stale_build_lock_is_named_with_how_to_clear_it(tmp_path):
    line, lock, still_waiting = wait_for_warning(tmp_path, hold=False)
    assert still_waiting  # the hazard itself: without the lock removed, the run would wait forever
    assert f"build lock {lock} is held by no process on this machine" in line
    assert f"rm {lock}" in line


def test_lock_of_a_running_build_is_named_with_its_process(tmp_path):
    line, lock, still_waiting = wait_for_warning(tmp_path, hold=True)
    assert still_waiting
    assert f"build lock {lock} is held by process {os.getpid()} on this machine: a build is running" in line
    assert "rm " not in line  # never advise deleting the lock of a live build
