"""Turning the errors a user can cause into one clear paragraph (used by run.py).

Known user errors: a bad config (unknown group choice, misspelled key, wrong type, unparsable override, missing
value), bad values caught by curvlab's own checks (ValueError, TypeError), missing data (FileNotFoundError) and
output folders that cannot be written (OSError). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

from hydra.errors import ConfigCompositionException, HydraException, InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

EXIT_OK, EXIT_USER_ERROR, EXIT_DIVERGED = 0, 2, 3
EXIT_BUG = 1  # an unexpected exception (a traceback is printed)
EXIT_INTERRUPTED = 4  # stopped by SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT after checkpointing: resumable
EXIT_NO_SPACE = 5  # the disk (or the file-size limit) is full: every complete metrics row and the last checkpoint kept
EXIT_KILLED = 130  # a second SIGINT: stopped at once, without a new checkpoint
STATUS_CODES = {"ok": EXIT_OK, "diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}  # a run that ended normally

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFullError(OSError):
    """Writing a result file failed because the disk, the quota or the file-size limit is full (exit code 5)."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (no space left), EDQUOT (quota) and EFBIG (file too large, e.g. RLIMIT_FSIZE) are treated alike."""
    return isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS)


def describe_user_error(exc: BaseException, during_job: bool = True) -> str | None:
    """One paragraph for a known user error, or None when `exc` looks like a bug.

    `during_job=False` for errors Hydra raises before a job starts, where an OSError can only come from creating
    the output folder.
    """
    if isinstance(exc, OSError) and not isinstance(exc, HydraException) and not during_job:
        where = f" '{exc.filename}'" if exc.filename else ""
        return _one_paragraph(
            f"cannot create the output folder{where}: {exc.strerror or exc}. Choose a writable output folder "
            f"with hydra.run.dir=/path/to/folder (or hydra.sweep.dir=/path/to/folder with -m)."
        )
    if isinstance(exc, MissingConfigException):
        return _missing_config(exc)
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        if describe_user_error(exc.__cause__) is None:
            return None  # a builder crashed: a bug, keep the traceback
    if isinstance(exc, HydraException):
        return _config_error(exc)
    if isinstance(exc, OmegaConfBaseException):
        return _one_paragraph(_omegaconf_message(exc))
    if isinstance(exc, (ValueError, TypeError, OSError)):  # OSError: missing data files, unwritable folders
        return _one_paragraph(str(exc))
    return None


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception that ended a run (see run.py)."""
    if is_disk_full(exc):
        return EXIT_NO_SPACE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_KILLED
    return EXIT_USER_ERROR if describe_user_error(exc) is not None else EXIT_BUG


def describe_disk_full(exc: OSError, run_folder: str | os.PathLike | None = None) -> str:
    """The message for a full disk; `run_folder` (the run's output folder) makes it name the folder to resume."""
    where = f" writing {exc.filename}" if exc.filename else ""
    limit = "(or raise the quota / file-size limit)"
    if run_folder is None:
        then = f"Free some space {limit} and continue with trainer.resume=<the run folder>."
    elif _has_checkpoint(run_folder):
        then = (f"The last checkpoint is intact. Free some space {limit} and continue with "
                f"trainer.resume={os.fspath(run_folder)}")
    else:
        then = (f"{os.fspath(run_folder)} holds no checkpoint yet, so the run cannot be resumed: free some space "
                f"{limit} and start it again.")
    return _one_paragraph(
        f"out of disk space{where} ({exc.strerror or exc}). The run stopped: every complete row is in metrics.jsonl. "
        + then
    )


def _has_checkpoint(folder: str | os.PathLike) -> bool:
    from runner.run_dir import CHECKPOINT, PREVIOUS  # imports torch: only once a run has failed

    return any(os.path.isfile(os.path.join(folder, name)) for name in (CHECKPOINT, PREVIOUS))


def debug_enabled() -> bool:
    return os.environ.get("CURVLAB_DEBUG", "") not in ("", "0")


def _missing_config(exc: MissingConfigException) -> str:
    path = exc.missing_cfg_file or ""
    if "/" in path and exc.options is not None:
        group, choice = path.rsplit("/", 1)
        options = ", ".join(exc.options) or "none"
        return (
            f"'{choice}' is not a choice of the config group '{group}'. Valid choices for {group}: {options}. "
            f"(The choices are the files conf/{group}/<name>.yaml.)"
        )
    return _one_paragraph(str(exc).split("\nConfig search path")[0])


def _config_error(exc: HydraException) -> str:
    cause = exc.__cause__
    text = str(exc)
    override = re.search(r"override (\S+)", text)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and isinstance(exc, ConfigCompositionException):
        key = cause.full_key or (text.split("'")[1] if "'" in text else "?")
        parent = cause.parent_node if isinstance(cause.parent_node, DictConfig) else None
        free_form = parent is not None and OmegaConf.get_type(parent) is dict  # a group such as model/optimizer
        return unknown_key_message(key, list(parent.keys()) if parent is not None else [], free_form)
    if isinstance(cause, OmegaConfBaseException):
        detail = _omegaconf_message(cause)
        prefix = f"invalid override {override.group(1)}: " if override else ""
        return _one_paragraph(prefix + detail)
    return _one_paragraph(text.split("\nConfig search path")[0])


def unknown_key_message(key: str, valid: list[Any], free_form: bool = False) -> str:
    """The one message for a key that is not in the config, misspelled or added with + to a typed group."""
    keys = ", ".join(sorted(str(k) for k in valid if not str(k).startswith("_") and k != "hydra"))
    where = key.rsplit(".", 1)[0] if "." in key else "the top level"
    hint = f" Valid keys under {where}: {keys}." if keys else ""
    if free_form:
        hint += f" To add a new key on purpose, prefix it with +, e.g. +{key}=..."
    return f"'{key}' is not a config key (misspelled?).{hint}"


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    """The first line of OmegaConf's message, plus the key it is about."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    key = getattr(exc, "full_key", None)
    if key and key not in message:
        message += f" (key: {key})"
    return message


def _one_paragraph(text: Any) -> str:
    return " ".join(str(text).split())
