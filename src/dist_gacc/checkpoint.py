"""Checkpoints that are either complete or absent, and resuming from the newest good one.

`accelerator.save_state` writes the model, optimizer, scheduler, GradScaler and every rank's RNG
states; we add `trainer_state.json` (loop counters, data position, the logged history, the settings
that define the math, and a manifest of every file's size and SHA-256). Everything is written into
`checkpoints/.tmp-step-N/` and renamed to `checkpoints/step-N/` only when complete: a crash mid-save
leaves a temporary folder that is never resumed from.

A run that keeps its best model (model/) saves it with each checkpoint (`best_model/`: copies, never links to
model/, whose files a user may rewrite in place; a file identical to the previous checkpoint's is a hard link to
that one), so a resume puts back the model/ that the checkpoint's `best` describes. Resuming from a checkpoint
older than the newest moves the newer ones (an abandoned continuation) aside into
`checkpoints/retired-from-step-N-<time>/`; only the newest such folder is kept.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from .errors import UserError

log = get_logger(__name__)

STATE_FILE = "trainer_state.json"
BEST_DIR = "best_model"  # in a checkpoint: model/ as it was at that update (when the run keeps its best model)
STEP_DIR = re.compile(r"^step-(\d+)$")
RETIRED_PREFIX = "retired-from-step-"  # checkpoints/retired-from-step-N-<time>-<random>/: see retire_newer


class CheckpointError(UserError):
    pass


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: str) -> dict[str, dict]:
    """Size and SHA-256 of every file, subfolders included (DeepSpeed writes pytorch_model/, FSDP's
    sharded state dicts write pytorch_model_fsdp_0/ and optimizer_0/), keyed by relative path."""
    files = sorted(os.path.relpath(os.path.join(root, name), folder)
                   for root, _, names in os.walk(folder) for name in names)
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": _sha256(os.path.join(folder, name))}
            for name in files if name != STATE_FILE}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves `step-N` checkpoints of a run every `every` updates and at each epoch's end."""

    def __init__(self, accelerator, run_dir: str, every: int | None, keep: int, fingerprint: dict,
                 before_rename=None, best_model_dir: str | None = None):
        self.accelerator, self.every, self.keep, self.fingerprint = accelerator, every, keep, fingerprint
        self.root = os.path.join(run_dir, "checkpoints")
        self.best_model_dir = best_model_dir  # model/ when the run keeps its best model: saved with each checkpoint
        self.before_rename = before_rename  # tests: a crash after the files, before the rename

    def due(self, state, window) -> bool:
        """Every `every` updates and at each epoch's end; never after the last update (the caller saves
        the final model)."""
        if state.done():
            return False
        return window.ends_epoch or bool(self.every and state.updates % self.every == 0)

    def save(self, state, reason: str) -> str:
        """Collective: every rank calls it at the same window boundary. `state` holds the position."""
        acc, position = self.accelerator, state.position(reason)
        name = f"step-{state.updates}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f".tmp-{name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)  # model, optimizer, scheduler, scaler, RNG of every rank
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.best_model_dir is not None and os.path.isdir(self.best_model_dir):
                # model/ is settled here (a new best was saved, collectively, before this save), and it is the
                # model the state's `best` describes: the two travel together.
                previous = complete_checkpoints(self.root)
                copy_best_model(self.best_model_dir, os.path.join(tmp, BEST_DIR),
                                os.path.join(previous[-1][1], BEST_DIR) if previous else None)
            if self.before_rename is not None:
                self.before_rename(tmp)
            record = {"state": dataclasses.asdict(state), "position": position, "world_size": acc.num_processes,
                      "fingerprint": self.fingerprint, "files": _manifest(tmp)}
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # a rerun reaching the same step replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)  # atomic on one file system: the checkpoint exists whole or not at all
            _fsync_dir(self.root)
            self._prune()
            log.info("checkpoint %s (epoch %d, window %d)", final, position["epoch"], position["window"])
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        steps = complete_checkpoints(self.root)
        for _, path in steps[: max(len(steps) - self.keep, 0)]:
            shutil.rmtree(path, ignore_errors=True)


def copy_best_model(model_dir: str, dst: str, previous: str | None) -> None:
    """A checkpoint's best_model/: model/'s files copied, never hard-linked to model/, whose files a user or a
    library may rewrite in place (an edit opened "r+b"; save_pretrained's config.json and tokenizer files are
    opened "w"): through a link that would change the checkpoint too, and its manifest would then call it
    corrupt. A file byte-identical to the same file of `previous` (the last checkpoint's best_model/) is a hard
    link to that one instead, so a best model that did not change costs no disk: nothing writes into a
    checkpoint after its rename."""
    filecmp.clear_cache()

    def link_or_copy(src: str, target: str) -> None:
        same = os.path.join(previous, os.path.relpath(src, model_dir)) if previous else None
        if same and os.path.isfile(same) and filecmp.cmp(src, same, shallow=False):
            try:
                os.link(same, target)
                return
            except OSError:  # another file system, or links not supported
                pass
        shutil.copy2(src, target)

    shutil.copytree(model_dir, dst, copy_function=link_or_copy)


def replace_folder(new: str | None, final: str) -> None:
    """Put the complete folder `new` at `final` by renames (None: remove `final`): `final` is always absent or
    complete (a crash between the renames leaves the previous one in `final`.old)."""
    old = f"{final}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.rename(final, old)
    if new is not None:
        os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def restore_best_model(path: str, record: dict, model_dir: str) -> None:
    """Main process, resuming a run that keeps its best model: model/ becomes the checkpoint's best model,
    so `best` and model/ describe the same evaluation even when the replay does not repeat the abandoned run."""
    saved = os.path.join(path, BEST_DIR)
    if os.path.isdir(saved):
        tmp = f"{model_dir}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)  # copies: an edit of model/ in place must not reach the checkpoint
        replace_folder(tmp, model_dir)
        log.info("model/ restored from %s (the best model as of update %d)", saved, record["state"]["updates"])
    elif record["state"].get("best") is None:
        if os.path.isdir(model_dir):  # no evaluation before this checkpoint: model/ is the abandoned run's
            replace_folder(None, model_dir)
            log.warning("removed %s: written after %s, which has no evaluation yet", model_dir, path)
    else:
        log.warning("%s holds no copy of the best model (written by an older version); %s is kept as found and "
                    "may not be the model its `best` entry describes", path, model_dir)


def retire_newer(run_dir: str, updates: int) -> str | None:
    """Main process, resuming from update `updates`: this run's checkpoints of later updates belong to the
    abandoned continuation. Moved aside (not deleted) into checkpoints/retired-from-step-N-<time>/, where
    pruning (which keeps the highest steps) and resume=auto never look. Returns that folder, or None.

    Only that newest abandoned continuation is kept (older retired folders are removed, and logged): it is the
    one a resume from the wrong checkpoint can still be undone with, while each folder holds up to
    trainer.keep_checkpoints whole checkpoints, so keeping every one would fill the disk a resume at a time."""
    root = os.path.join(run_dir, "checkpoints")
    newer = [path for step, path in complete_checkpoints(root) if step > updates]
    if not newer:
        return None
    retired = tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{updates}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root)
    for path in newer:
        os.rename(path, os.path.join(retired, os.path.basename(path)))
    _fsync_dir(root)
    log.warning("resuming from update %d: moved the newer checkpoints %s (an abandoned continuation) aside into %s",
                updates, ", ".join(os.path.basename(p) for p in newer), retired)
    older = sorted(os.path.join(root, d) for d in os.listdir(root)
                   if d.startswith(RETIRED_PREFIX) and os.path.join(root, d) != retired)
    for path in older:
        shutil.rmtree(path, ignore_errors=True)
    if older:
        log.info("removed the older abandoned continuation%s %s: only the newest is kept",
                 "s" if len(older) > 1 else "", ", ".join(older))
    return retired


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the renamed (complete) checkpoint folders, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.match(d))]
    return sorted(found)


def read_checkpoint(path: str) -> dict:
    """The checkpoint's trainer_state.json after checking every file against its manifest."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"resume={path}: no such checkpoint folder")
    try:
        with open(state_file) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"resume={path}: unreadable {STATE_FILE}: {err}") from err
    for name, meta in record.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"resume={path}: missing file {name}")
        if os.path.getsize(file) != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"resume={path}: {name} is corrupt (size or SHA-256 differs from the manifest)")
    return record


def choose(accelerator, run_dir: str, resume: str | None) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its record; the main process decides, every rank agrees."""
    choice: list = [None]
    if accelerator.is_main_process:
        try:
            choice[0] = _choose(run_dir, resume)
        except CheckpointError as err:
            choice[0] = err
    broadcast_object_list(choice, from_process=0)
    if isinstance(choice[0], CheckpointError):
        raise choice[0]
    return choice[0] if choice[0] is not None else (None, None)


def choose_on_main(run_dir: str, resume: str | None) -> tuple[str, dict] | None:
    """choose() on the main process alone, without a collective or a log line: the checkpoint and its
    record, or None."""
    return _choose(run_dir, resume, quiet=True)


def _choose(run_dir: str, resume: str | None, quiet: bool = False):
    if resume in (None, "", "none", "null"):
        return None
    if resume != "auto":
        return resume, read_checkpoint(resume)
    root = os.path.join(run_dir, "checkpoints")
    for _, path in reversed(complete_checkpoints(root)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            if not quiet:
                log.warning("skipping checkpoint %s: %s", path, err)
    if not quiet:
        log.info("resume=auto: no complete checkpoint in %s; starting fresh", root)
    return None


def saved_world_size(record: dict) -> int:
    """Processes that wrote the checkpoint (older checkpoints kept it in their fingerprint)."""
    return int(record.get("world_size") or record["fingerprint"].get("world_size") or 1)


# Recorded by older checkpoints' fingerprints, no longer part of the math: a resume may change them.
NOT_MATH = ("world_size",)


def check_fingerprint(saved: dict, current: dict, path: str, force: bool) -> None:
    """Refuse to resume with settings that change the math, listing each difference. (The world size and the
    micro-batch may change: see elastic.py.)"""
    saved = {k: v for k, v in saved.items() if k not in NOT_MATH}
    if saved.get("engine") == "single":  # older checkpoints told one process from DDP: the same math
        saved["engine"] = "ddp"
    keys = sorted(set(saved) | set(current))
    diffs = [f"  {k}: checkpoint {saved.get(k)!r} -> now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if not diffs:
        return
    text = "\n".join(diffs)
    if force:
        log.warning("resume_force=true: resuming %s despite changed settings:\n%s", path, text)
        return
    raise CheckpointError(f"resume={path}: the checkpoint was trained with different settings that change "
                          f"the result:\n{text}\nUse the same settings, or resume_force=true to go on anyway.")
