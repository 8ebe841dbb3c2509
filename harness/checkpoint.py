"""Checkpoints that cannot lie: atomic commit, verification, retention, exact resume.

Layout of one checkpoint, `output_dir/checkpoints/step-N/`:

    ds/                  DeepSpeed engine state (weights, optimizer, LR schedule), every rank's shard
    trainer_state.json   step, data position, token counters, bad-step count, fingerprints, resolved config
    rng-rank{R}.json     each rank's python / numpy / torch (/ cuda) RNG states
    hf/                  model config + tokenizer, so launch/export.py needs nothing else
    manifest.json        written last: every file with its size, step, world size, ZeRO stage, version

Commit protocol (`save`, one named function per stage): every rank writes into `step-N.tmp/`
and fsyncs its own files; all ranks agree that writing succeeded; only then rank 0 writes the
manifest, renames the folder to `step-N/` and replaces `latest` atomically. A folder whose
manifest is missing or does not match the files on disk is never resumed from and never counts
as a kept checkpoint, so a `kill -9` at any moment leaves either the previous checkpoint or the
new one, never a half one.

The data position needs no sampler state: the rows of step N are a pure function of
(seed, N, global batch) (`data.StepSampler`), so the step counter is the position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from harness import __version__, dist
from harness.errors import HarnessError, RequeueRequested

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


# -- files ------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    """Write and fsync, so a crash after this returns cannot leave a truncated file."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, owned) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and owned(path):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def owned_by(rank: int):
    """Which files of a checkpoint this rank wrote: DeepSpeed names per-rank shards
    `*pp_rank_{R}_*`; rank 0 writes everything without a rank in its name."""
    def owned(path: Path) -> bool:
        match = re.search(r"pp_rank_(\d+)_|rng-rank(\d+)\.json$", path.name)
        if match:
            return int(match.group(1) or match.group(2)) == rank
        return rank == 0
    return owned


# -- RNG --------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- verification and discovery ---------------------------------------------------------------

def verify(step_dir: Path) -> tuple[dict | None, str]:
    """(manifest, "") if the checkpoint is complete on disk, else (None, why not)."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "no manifest (the save did not finish)"
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest ({err})"
    for rel, size in manifest.get("files", {}).items():
        path = step_dir / rel
        if not path.is_file():
            return None, f"{rel} is missing"
        if path.stat().st_size != size:
            return None, f"{rel} has {path.stat().st_size} bytes, the manifest says {size}"
    if not manifest.get("files"):
        return None, "the manifest lists no files"
    return manifest, ""


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every `step-N` folder under root, oldest first (verified or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def newest_verified(root: Path, warn=print) -> Path | None:
    for step, path in reversed(checkpoints(root)):
        manifest, why = verify(path)
        if manifest is not None:
            return path
        warn(f"warning: ignoring checkpoint {path}: {why}")
    return None


def prune(root: Path, keep_last: int) -> None:
    """Delete crash leftovers and all but the newest `keep_last` verified checkpoints."""
    for leftover in root.glob("step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return
    verified = [path for _, path in checkpoints(root) if verify(path)[0] is not None]
    for path in verified[:-keep_last]:  # the newest verified one is always in the kept tail
        shutil.rmtree(path, ignore_errors=True)


# -- save -------------------------------------------------------------------------------------
#
# A save is a sequence of named stages, each a function of its own, so a crash or a full disk can
# be studied at every boundary between them (the tests wrap these functions).

def save(engine, out: Path, step: int, trainer_state: dict, hf_files, info: dist.DistInfo, keep_last: int) -> Path:
    """Save and commit checkpoint `step-{step}`; every rank must call this."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    error = None
    if info.is_rank0:
        try:
            make_staging(tmp)
        except OSError as err:
            error = f"rank 0: {err}"
    error = dist.agree(error)
    if error is None:
        try:
            write_engine_state(engine, tmp)
            write_rank_files(tmp, trainer_state, hf_files, info)
        except OSError as err:
            error = f"rank {info.rank}: {err}"
        error = dist.agree(error)
    if error is None and info.is_rank0:
        try:
            write_manifest(tmp, step, engine.zero_stage, trainer_state["model_fingerprint"], info.world_size)
            commit(tmp, final)
            point_latest(root, final)
            prune(root, keep_last)
        except OSError as err:
            error = f"rank 0: {err}"
    error = dist.agree(error)
    if error:
        if info.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"saving the checkpoint of step {step} failed ({error}); the earlier checkpoints "
                           f"in {root} are intact")
    return final


def make_staging(tmp: Path) -> None:
    """Rank 0: an empty `step-N.tmp/` (a leftover of a crashed save of the same step is removed)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def write_engine_state(engine, tmp: Path) -> None:
    """Every rank: its shard of weights, optimizer and LR-schedule state, through DeepSpeed."""
    engine.save_state(tmp / "ds")


def write_rank_files(tmp: Path, trainer_state: dict, hf_files, info: dist.DistInfo) -> None:
    """Every rank: its RNG state; rank 0 also the trainer state and the HF files. Then each rank
    fsyncs the files it wrote, so the manifest never lists bytes that are not on disk yet."""
    write_json(tmp / f"rng-rank{info.rank}.json", rng_state())
    if info.is_rank0:
        write_json(tmp / STATE, trainer_state)
        hf_files(tmp / "hf")
    fsync_tree(tmp, owned_by(info.rank))


def write_manifest(tmp: Path, step: int, zero_stage: int, model_fingerprint: str, world_size: int) -> None:
    """Rank 0, after every rank's files are on disk: the list that makes the checkpoint verifiable."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(tmp / MANIFEST, {"step": step, "world_size": world_size, "zero_stage": zero_stage,
                                "harness_version": __version__, "files": files, "model_fingerprint": model_fingerprint})


def commit(tmp: Path, final: Path) -> None:
    """Rank 0: `step-N.tmp/` becomes `step-N/` in one rename."""
    if final.exists():  # the same step saved again, e.g. a signal right after a periodic save
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def point_latest(root: Path, final: Path) -> None:
    """Rank 0: `latest` names the new checkpoint (a convenience; resume verifies, it does not trust it)."""
    replace_atomically(root / "latest", final.name + "\n")


# -- resume -----------------------------------------------------------------------------------

def resolve_resume(resume: str, out: Path) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start; raise if unusable."""
    if not resume:
        return None
    if resume == "auto":
        return newest_verified(out / "checkpoints", warn=dist.print0)
    path = Path(resume)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        path = newest_verified(path / "checkpoints", warn=dist.print0) or path  # a run directory was given
    if not path.is_dir():
        raise HarnessError(f"--resume {resume}: no such folder")
    manifest, why = verify(path)
    if manifest is None:
        raise HarnessError(f"--resume {resume}: not a complete checkpoint: {why}")
    return path


def check_compatible(ckpt: Path, expected: dict) -> dict:
    """Compare a checkpoint with the current run before any state is touched; return its state."""
    manifest, _ = verify(ckpt)
    state = json.loads((ckpt / STATE).read_text())
    problems = []
    if manifest["model_fingerprint"] != expected["model_fingerprint"]:
        problems.append("it was written for another model (the model config differs)")
    if manifest["zero_stage"] != expected["zero_stage"]:
        problems.append(f"it was written with ZeRO stage {manifest['zero_stage']}, this run uses "
                        f"{expected['zero_stage']}")
    for key, what in (("data_fingerprint", "training data or tokenization"), ("global_batch_size", "global batch size"),
                      ("seed", "seed"), ("batch_layout", "batch layout")):
        if state.get(key) != expected[key]:
            problems.append(f"the {what} differs ({state.get(key)} in the checkpoint, {expected[key]} now), "
                            f"so its data position would mean other rows")
    if problems:
        raise HarnessError(f"cannot resume from {ckpt}:\n  " + "\n  ".join(problems))
    return state


def written_world_size(ckpt: Path) -> int:
    return verify(ckpt)[0]["world_size"]


def restore(engine, ckpt: Path, info: dist.DistInfo) -> None:
    """Load engine and RNG state. On another world size, go through DeepSpeed's universal
    checkpoint format (converted once, next to the original): weights, optimizer state and LR
    schedule carry over exactly; the RNG streams cannot (ranks differ), so a run that draws
    random numbers (dropout) continues statistically equivalent rather than bit for bit."""
    old_world = written_world_size(ckpt)
    if old_world == info.world_size:
        engine.load_state(ckpt / "ds")
        set_rng_state(json.loads((ckpt / f"rng-rank{info.rank}.json").read_text()))
        return
    universal = ckpt / "ds_universal"
    if info.is_rank0 and not universal.exists():
        staging = ckpt / "ds_universal.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        engine.convert_to_universal(ckpt / "ds", staging)
        os.rename(staging, universal)
    dist.barrier()
    engine.load_state(universal)
    set_rng_state(json.loads((ckpt / f"rng-rank{info.rank % old_world}.json").read_text()))


# -- signals ----------------------------------------------------------------------------------

# Left in the run directory by rank 0 once the checkpoint saved on a stop request has committed.
# slurm/train.sbatch requeues the job when it finds it, whatever status srun returns: a node killed
# while it exits (--kill-on-bad-exit) turns the ranks' 75 into 143. The script deletes it before
# each attempt.
REQUEUE_MARKER = ".requeue"


def mark_requeue(out: Path, saved: Path, info: dist.DistInfo) -> None:
    """Call after the stop request's checkpoint committed, on every rank (rank 0 writes)."""
    if not info.is_rank0:
        return
    try:
        replace_atomically(out / REQUEUE_MARKER, json.dumps({"checkpoint": str(saved),
                                                             "job": os.environ.get("SLURM_JOB_ID")}) + "\n")
    except OSError as err:  # the checkpoint is safe; only the hint to the batch script is lost
        print(f"warning: could not write {out / REQUEUE_MARKER} ({err}): a job is requeued only if every node "
              f"exits {RequeueRequested.exit_code}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGUSR1 / SIGTERM only set a flag; the loop acts on it at the next step boundary, after
    all ranks agree, so a signal that arrives during a save lets that save finish first.

    A context manager: leaving it, however the run ends, gives the process its former handlers
    back (matters when training runs in-process)."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
