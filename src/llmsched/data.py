"""Where the shared real data lives: one setting, ``LLMSCHED_DATA``.

The data (traces, prompts, GPU profiles) is never copied into the repository. Code finds it
through the environment variable ``LLMSCHED_DATA``; without it, ``../shared/data`` beside the
checkout (or the current directory) is used when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LLMSCHED_DATA"


def data_dir() -> Path | None:
    """The shared data folder, or None when it cannot be found."""
    if value := os.environ.get(ENV_VAR):
        path = Path(value).expanduser()
        return path if path.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def data_path(relative: str) -> Path:
    """A file under the shared data folder; a clear error when the folder or file is missing."""
    root = data_dir()
    if root is None:
        raise FileNotFoundError(
            f"shared data folder not found: set {ENV_VAR} to the folder holding traces/, prompts/ "
            "and profiles/ (by default ../shared/data beside the checkout)"
        )
    path = root / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (data folder: {root}, from {ENV_VAR})")
    return path


def resolve(path: str | Path, what: str | None = None) -> Path:
    """A user-given data path: as given when it exists, else relative to the shared data
    folder (so configs can say `traces/azure2023/...` wherever they run from). With `what`
    (say "trace file"), a path found in neither place is an error that says where it looked."""
    given = Path(path).expanduser()
    if given.exists():
        return given
    root = data_dir()
    if not given.is_absolute() and root is not None and (root / given).exists():
        return root / given
    if what is not None:
        raise not_found(given, what)
    return given


def not_found(path: str | Path, what: str = "file") -> FileNotFoundError:
    """The error for a data path that is neither where it was given nor in the data folder."""
    given = Path(path).expanduser()
    looked = [str(given.absolute())]
    root = data_dir()
    if root is not None and not given.is_absolute():
        looked.append(str(root / given))
    if root is not None:
        origin = f"set by ${ENV_VAR}" if os.environ.get(ENV_VAR) else f"set ${ENV_VAR} for another"
        folder = f"relative paths are also looked up in the data folder {root} ({origin})"
    elif os.environ.get(ENV_VAR):
        folder = f"${ENV_VAR} is {os.environ[ENV_VAR]}, which is not a folder"
    else:
        folder = (
            f"relative paths are also looked up in ${ENV_VAR}, which is not set (nor is there "
            "a ../shared/data beside the checkout)"
        )
    return FileNotFoundError(
        f"{what} not found: {path}; looked at {' and '.join(looked)}; {folder}"
    )
