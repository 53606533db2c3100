"""Run state shared by every method that checkpoints: which files a run keeps in its
``checkpoint_dir`` (files.py), the lock that gives a folder to one process (lock.py), the
checksummed state file (state_file.py), the run's fingerprint that refuses a resume of another
run (fingerprint.py), the memory-mapped per-sample sums (values_store.py) and the block-wise
checksums of tensors and arrays (digest.py).

A method uses it like this (DVGS's loop and TracIn do)::

    files = runstate.CheckpointFiles(Path(checkpoint_dir), rank, method="TracIn")
    with runstate.DirLock(files):
        state = runstate.read_state(files)          # None: a fresh folder
        fp = runstate.fingerprint(settings, seed, world_size, model, loss, data_identity)
        if state is not None:
            runstate.compare(state["fingerprint"], fp, files)     # refuses another run's folder
        store = runstate.open_store(files, n, state=state, n_snapshots=K, keep_snapshots=False,
                                    snapshot_dtype=np.float32)
        ...  # after each unit of work:
        runstate.write_state(files.state, {"format": runstate.FORMAT, "fingerprint": fp, ...})

Every problem is one ``CheckpointError`` (a ValueError) naming ``checkpoint_dir`` and the way out.
Call these through the package (``runstate.write_state``), not by importing the function into a
method's namespace: tests interrupt runs by replacing ``runstate.write_state``.
"""
from dvgs_fast.runstate.digest import digest_of_array, new_hash, update_with_array, update_with_tensor
from dvgs_fast.runstate.files import CheckpointError, CheckpointFiles, checkpoint_error
from dvgs_fast.runstate.fingerprint import callable_identity, compare, fingerprint, model_structure, model_weights
from dvgs_fast.runstate.lock import DirLock
from dvgs_fast.runstate.state_file import FORMAT, read_state, write_state
from dvgs_fast.runstate.values_store import SNAP_NAME, SUMS_NAME, StoreFileError, ValuesStore, open_store

__all__ = ["CheckpointError", "CheckpointFiles", "DirLock", "FORMAT", "SNAP_NAME", "SUMS_NAME", "StoreFileError",
           "ValuesStore", "callable_identity", "checkpoint_error", "compare", "digest_of_array", "fingerprint",
           "model_structure", "model_weights", "new_hash", "open_store", "read_state", "update_with_array",
           "update_with_tensor", "write_state"]
