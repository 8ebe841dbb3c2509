"""Checkpoints that cannot lie: atomic commit, verification, retention, exact resume.

Layout of one checkpoint, `output_dir/checkpoints/step-N/`:

    ds/                  DeepSpeed engine state (weights, optimizer, LR schedule), every rank's shard
    trainer_state.json   step, data position, token counters, bad-step count, fingerprints, resolved config
    rng-rank{R}.json     each rank's python / numpy / torch (/ cuda) RNG states
    hf/                  model config + tokenizer, so launch/export.py needs nothing else
    manifest.json        written last: every file with its size and content hash, step, world size, ZeRO stage, version

Commit protocol (`save`, one named function per stage): all ranks first agree that every weight is
finite (a checkpoint of NaN weights is never written); every rank writes into `step-N.tmp/`, then
hashes (xxh3_64) and fsyncs its own files; all ranks agree that writing succeeded and pool their
hashes; only then rank 0 writes the manifest, renames the folder to `step-N/` and replaces
`latest` atomically. A folder whose manifest is missing or does not match the files on disk is
never resumed from and never counts as a kept checkpoint, so a `kill -9` at any moment leaves
either the previous checkpoint or the new one, never a half one.

Verification has two depths: `verify` compares sizes (cheap: discovery, retention), and
`verify_content` re-hashes every file against the manifest, the files shared out over the ranks;
a checkpoint is resumed from (and named as the one to go back to) only after both.

The data position needs no sampler state: the rows of step N are a pure function of
(seed, N, global batch) (`data.StepSampler`), so the step counter is the position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import xxhash

from harness import __version__, dist
from harness.config import MAY_CHANGE_ON_RESUME, TrainConfig
from harness.errors import HarnessError, NonFiniteWeights, RequeueRequested

MANIFEST = "manifest.json"
HASH = "xxh3_64"  # fast (GB/s), enough to detect a changed byte; not a defence against a crafted file
HASH_BLOCK = 8 << 20
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


def fsync_tree(root: Path, owned) -> dict[str, str]:
    """fsync the files this rank wrote and hash them in the same pass (read back from the page
    cache right after writing): {path relative to root: xxh3_64 hex digest}."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and owned(path):
            with open(path, "rb+") as f:
                digests[str(path.relative_to(root))] = file_hash(f)
                os.fsync(f.fileno())
    return digests


def file_hash(f) -> str:
    digest = xxhash.xxh3_64()
    for block in iter(lambda: f.read(HASH_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


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
    for rel, entry in manifest.get("files", {}).items():
        path = step_dir / rel
        size = entry["size"] if isinstance(entry, dict) else entry  # an int: written before content hashes
        if not path.is_file():
            return None, f"{rel} is missing"
        if path.stat().st_size != size:
            return None, f"{rel} has {path.stat().st_size} bytes, the manifest says {size}"
    if not manifest.get("files"):
        return None, "the manifest lists no files"
    return manifest, ""


def verify_content(step_dir: Path, manifest: dict) -> str:
    """"" if every file's content hash matches the manifest, else what differs. A collective when
    the job has several ranks (all must call it, for the same checkpoint): the files are shared
    out by size over the ranks, each hashes its share once, and all learn every mismatch."""
    files = {rel: e for rel, e in manifest["files"].items() if isinstance(e, dict) and HASH in e}
    world, rank = dist.world_size_and_rank()
    load, mine = [0] * world, []
    for rel in sorted(files, key=lambda r: (-files[r]["size"], r)):  # largest first, to the least-loaded rank
        owner = load.index(min(load))
        load[owner] += files[rel]["size"] + 1
        if owner == rank:
            mine.append(rel)
    bad = []
    for rel in mine:
        try:
            with open(step_dir / rel, "rb") as f:
                got = file_hash(f)
        except OSError as err:
            bad.append(f"{rel} cannot be read ({err})")
            continue
        if got != files[rel][HASH]:
            bad.append(f"{rel} does not match its content hash (the file changed after it was written)")
    bad = sorted(b for found in dist.all_gather_objects(bad) for b in found)
    return "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every `step-N` folder under root, oldest first (verified or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def newest_verified(root: Path, warn=print, content: bool = False) -> Path | None:
    """The newest checkpoint whose files match the manifest's sizes and, with `content`, hashes
    (then a collective: every rank must call it)."""
    for step, path in reversed(checkpoints(root)):
        manifest, why = verify(path)
        if manifest is not None and content:
            why = verify_content(path, manifest)
        if not why:
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
    check_weights_finite(engine, step, root)
    error = None
    if info.is_rank0:
        try:
            make_staging(tmp)
        except OSError as err:
            error = f"rank 0: {err}"
    error = dist.agree(error)
    digests = {}
    if error is None:
        mine = {}
        try:
            write_engine_state(engine, tmp)
            mine = write_rank_files(tmp, trainer_state, hf_files, info)
        except OSError as err:
            error = f"rank {info.rank}: {err}"
        # One collective: whether every rank's write succeeded, and every rank's file hashes.
        gathered = dist.all_gather_objects((error, mine))
        error = next((e for e, _ in gathered if e), None)
        digests = {rel: h for _, hashes in gathered for rel, h in hashes.items()}
    if error is None and info.is_rank0:
        try:
            write_manifest(tmp, step, engine.zero_stage, trainer_state["model_fingerprint"], info.world_size, digests)
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


def check_weights_finite(engine, step: int, root: Path) -> None:
    """Every rank, before anything is written: a checkpoint of non-finite weights would be
    resumed from as if it were good."""
    bad = engine.non_finite_weights()
    if bad:
        raise NonFiniteWeights(
            f"the weights hold NaN or Inf after step {step} ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); "
            f"checkpoint step-{step} was not written. Newest checkpoint that verifies: "
            f"{newest_verified(root, warn=lambda _: None, content=True) or 'none'}")


def make_staging(tmp: Path) -> None:
    """Rank 0: an empty `step-N.tmp/` (a leftover of a crashed save of the same step is removed)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def write_engine_state(engine, tmp: Path) -> None:
    """Every rank: its shard of weights, optimizer and LR-schedule state, through DeepSpeed."""
    engine.save_state(tmp / "ds")


def write_rank_files(tmp: Path, trainer_state: dict, hf_files, info: dist.DistInfo) -> dict[str, str]:
    """Every rank: its RNG state; rank 0 also the trainer state and the HF files. Then each rank
    hashes and fsyncs the files it wrote (its DeepSpeed shards included), so the manifest never
    lists bytes that are not on disk yet; returns those hashes."""
    write_json(tmp / f"rng-rank{info.rank}.json", rng_state())
    if info.is_rank0:
        write_json(tmp / STATE, trainer_state)
        hf_files(tmp / "hf")
    return fsync_tree(tmp, owned_by(info.rank))


def write_manifest(tmp: Path, step: int, zero_stage: int, model_fingerprint: str, world_size: int,
                   digests: dict[str, str]) -> None:
    """Rank 0, after every rank's files are on disk: the list that makes the checkpoint verifiable."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(tmp))
            if rel not in digests:  # every file has a writer; one that hashed nothing is a bug, not a skip
                raise RuntimeError(f"no rank hashed {rel} of the checkpoint")
            files[rel] = {"size": p.stat().st_size, HASH: digests[rel]}
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

def resolve_resume(resume: str, out: Path, content: bool = False, warn=dist.print0) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start; raise if unusable.

    Without `content` only sizes are compared (cheap, no collective: the early input checks);
    with it every file's hash too, and a checkpoint that fails is passed over with a warning for
    an older one ("auto", or a run directory), or refused (a checkpoint folder given by name).
    """
    if not resume:
        return None
    if resume == "auto":
        return newest_verified(out / "checkpoints", warn=warn, content=content)
    path = Path(resume)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        path = newest_verified(path / "checkpoints", warn=warn, content=content) or path  # a run directory was given
    if not path.is_dir():
        raise HarnessError(f"--resume {resume}: no such folder")
    manifest, why = verify(path)
    if manifest is None:
        raise HarnessError(f"--resume {resume}: not a complete checkpoint: {why}")
    if content:
        why = verify_content(path, manifest)
        if why:
            raise HarnessError(f"--resume {resume}: the checkpoint is corrupt: {why}")
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


# ds_config keys that follow the batch flags (the global batch is compared on its own) or are set
# by the resume itself.
DS_KEYS_FREE_ON_RESUME = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                          "checkpoint")


def resume_changes(ckpt: Path, recorded: dict, now: dict) -> dict:
    """Compare this run's settings (`now`, preflight's TrainSetup.resolved()) with those the
    checkpoint recorded: raise naming every difference a resume must not make (every flag outside
    config.MAY_CHANGE_ON_RESUME, and the resolved seq_len, precision, DeepSpeed config and, where
    the LR schedule depends on it, length); return {flag: [in the checkpoint, now]} of the others."""
    flags = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    then_flags, now_flags = {**flags, **recorded.get("config", {})}, now["config"]
    refused, changed = [], {}
    for name, value in now_flags.items():
        if then_flags.get(name) == value:
            continue
        if name in MAY_CHANGE_ON_RESUME:
            changed[name] = [then_flags.get(name), value]
        else:
            refused.append(f"--{name} is {value!r}, the checkpoint's run had {then_flags.get(name)!r}")
    then_res, now_res = recorded.get("resolved", {}), now["resolved"]
    for key in ("seq_len", "dtype"):
        if key in then_res and then_res[key] != now_res[key]:
            refused.append(f"the resolved {key} is {now_res[key]!r}, the checkpoint's run had {then_res[key]!r}")
    if then_res.get("total_steps", now_res["total_steps"]) != now_res["total_steps"]:
        cfg = now_flags
        if cfg["lr_schedule"] != "constant" or cfg["warmup_ratio"] > 0:
            refused.append(f"the run now has {now_res['total_steps']} steps, the checkpoint's run had "
                           f"{then_res['total_steps']}, and the {cfg['lr_schedule']} schedule"
                           f"{' with --warmup_ratio' if cfg['warmup_ratio'] > 0 else ''} depends on it: the learning "
                           f"rate would jump at the resume (keep --max_steps/--epochs, or start a new run)")
        else:
            changed["total_steps"] = [then_res["total_steps"], now_res["total_steps"]]

    def ds(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in DS_KEYS_FREE_ON_RESUME}

    if "ds_config" in recorded and ds(recorded["ds_config"]) != ds(now["ds_config"]):
        keys = sorted(k for k in {*ds(recorded["ds_config"]), *ds(now["ds_config"])}
                      if recorded["ds_config"].get(k) != now["ds_config"].get(k))
        refused.append(f"the filled DeepSpeed config differs in {', '.join(keys)}")
    if refused:
        allowed = ", ".join(f"--{n}" for n in MAY_CHANGE_ON_RESUME if n not in ("resume", "overwrite", "local_rank"))
        raise HarnessError(f"cannot resume from {ckpt}: this run is not the one it saved:\n  " + "\n  ".join(refused)
                           + f"\nFlags that may change on resume: {allowed} (see docs/checkpoints.md)")
    return changed


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
    """SIGUSR1, SIGTERM and a first Ctrl-C (SIGINT) only set a flag; the loop acts on it at the
    next step boundary, after all ranks agree: it saves a checkpoint and exits 75. A signal that
    arrives during a save lets that save finish first; one that arrives before training starts
    (the checks, the model load: `train.run` installs this first) is kept for the first step.

    A second Ctrl-C, more than INTERRUPT_REPEAT_S after the first, stops the process at once with
    status 130 (128 + SIGINT) and a one-line message, without saving. It must work while the main
    thread waits inside a collective or a kernel, where Python runs no signal handler: Python's
    own C-level handler also writes each signal's number to a pipe (`signal.set_wakeup_fd`), and
    a thread reading that pipe acts on it. Two Ctrl-C within INTERRUPT_REPEAT_S count as one:
    torchrun passes the terminal's Ctrl-C on to its workers, which then see it twice.

    A context manager: leaving it, however the run ends, gives the process its former handlers
    back (matters when training runs in-process)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    INTERRUPT_REPEAT_S = 1.0

    def __init__(self):
        self.requested = False
        self._first_interrupt: float | None = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_w, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._pipe_w, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="harness-signals", daemon=True)
        self._watcher.start()

    def _handler(self, signum, frame):
        self.requested = True

    def _watch(self) -> None:
        while True:
            try:
                received = os.read(self._pipe_r, 64)
            except OSError:
                return
            if not received:
                return  # the pipe was closed: the context ended
            for signum in received:
                self.requested = True  # also here: the main thread may be blocked where handlers do not run
                if signum == signal.SIGINT:
                    self._interrupt()

    def _interrupt(self) -> None:
        now = time.monotonic()
        if self._first_interrupt is None:
            self._first_interrupt = now
            if os.environ.get("RANK", "0") == "0":
                os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then exiting with 75 "
                            b"(resume with --resume auto); press Ctrl-C again to stop at once without saving\n")
        elif now - self._first_interrupt > self.INTERRUPT_REPEAT_S:
            if os.environ.get("RANK", "0") == "0":
                os.write(2, b"\nCtrl-C again: stopping now without saving; the checkpoints already written are intact\n")
            os._exit(128 + signal.SIGINT)

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._pipe_w)  # the watching thread reads end-of-file and returns
        self._watcher.join(timeout=5)
        os.close(self._pipe_r)
