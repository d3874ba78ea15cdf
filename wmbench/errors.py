"""Errors a user can act on: the CLI prints them on one line and exits with code 2 (3 for ``CellFailed``)."""

from __future__ import annotations

import errno


# The start of a row's ``detect_note`` when the attack could not apply to the model (the row has no
# verdict and its mark was not attacked: the leaderboard leaves it out of removals), and of one whose
# detection did not apply because the attacked model no longer fits the key (the leaderboard reads
# any attacked row without a verdict whose training had one as unreadable: older rows lack this note).
NOT_APPLIED_NOTE = "attack not applicable"
UNREADABLE_NOTE = "detection not applicable"
# A part of a row's ``detect_note`` (after any other note, joined by "; ") when its method entry asked
# for resynchronised detection (``resync: true``) but the resync could not run: its verdict is plain
# detection's, and the leaderboard counts the seed as ``resync failed``.
RESYNC_FAILED_NOTE = "resync failed"
# A part of a row's ``detect_note`` when resync could not match the model's units (torch-pruning
# cannot trace it: ShuffleNetV2) but undid the rescaling of its BatchNorm- and ReLU-coupled layers
# in place, or left in place unit groups whose matching changed the suspect's outputs
# (wmbench.resync): the verdict is read on that model, the leaderboard does not count it as failed.
RESYNC_PARTIAL_NOTE = "resync partial"
# A part of a row's ``detect_note`` (the last, joined by "; ") when its training's clean model is at
# chance accuracy (``wmbench.metrics.at_chance``): the leaderboard marks its method's clean error.
AT_CHANCE_NOTE = "clean model at chance accuracy"

class WmbenchError(Exception):
    """Base of the errors wmbench reports to the user without a traceback."""


class ConfigError(WmbenchError):
    """A bad value in a scenario: names the file (once known) and the field."""

    def __init__(self, field: str, message: str, file: str | None = None) -> None:
        self.field = field
        self.message = message
        self.file = file
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:
        return (ConfigError, (self.field, self.message, self.file))  # picklable (sent back by Ray workers)

    def in_file(self, file: str) -> "ConfigError":
        """The same error, now naming the scenario file."""
        return ConfigError(self.field, self.message, file)

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        return f"{where}: {self.message}" if where else self.message


class CellFailed(WmbenchError):
    """A component's own error (a plug-in's bug) in the one cell a command works on outside a grid
    (``wmbench embed``): a run records it in the cell's ``failure`` column and exits 3, as the
    command does with this one line."""

    exit_code = 3


class TrainingDiverged(WmbenchError):
    """A training's loss or weights became non-finite (NaN or infinity): the cell fails with this
    reason and the model is never cached."""


class DataEdited(WmbenchError):
    """A method or attack edited the dataset shared by every cell of a run: the cell fails with this
    reason, its training is never cached, and the next cell reads the data again."""


class UnstorableKey(WmbenchError):
    """A method's key holds what its file cannot (a non-tensor in ``key.tensors``, a value JSON
    cannot write in ``key.meta``): its training's cells fail, ``wmbench embed`` writes nothing."""


class NotApplicable(WmbenchError):
    """A detector or an attack cannot be applied to this model (channels physically removed, an
    architecture torch-pruning cannot trace): the cell's row says why instead of failing."""


class Incompatible(WmbenchError):
    """A model, a dataset and a method that cannot work together (a model whose poolings need larger
    images, deepsigns on a model without a Linear classifier, more carriers than the model has), in
    a grid where the same entries have other combinations: that training's cells fail with this
    reason and the rest of the grid runs. (With one model on one dataset the scenario itself is
    wrong: a ConfigError.)"""


# errno values that say the machine cannot go on (full disk or quota, read-only or unreadable
# files, a path component that is a file, a stale network mount, an I/O error, no memory or file handles): the run stops (exit 4). Other OSErrors (a
# plug-in's missing file, a timeout, a refused connection) fail their cell only.
MACHINE_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
    errno.ENOTDIR, errno.ESTALE,
})


def machine_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError of the machine (MACHINE_ERRNOS), which stops a run."""
    return isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS


def stops_run(exc: BaseException) -> bool:
    """Whether ``exc`` ends a run rather than one cell: the scenario is wrong (ConfigError, exit 2)
    or the machine cannot go on (``machine_fault``, exit 4)."""
    return isinstance(exc, ConfigError) or machine_fault(exc)

