"""Hub ids wherever a model or adapter is named: `org/name[@revision]` resolved to its snapshot folder in
huggingface_hub's cache (fetched there by huggingface_hub when the hub is reachable, read from the cache alone
under HF_HUB_OFFLINE=1), and a snapshot folder recognised as such, so manifests and stage keys carry the
commit it holds. A local path that exists always wins over a hub id of the same spelling."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import BadInput, EnvironmentProblem

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.\-/]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
REPO_FOLDER_PREFIX = "models--"  # huggingface_hub's cache: models--<org>--<name>/snapshots/<commit>/


def parse_hub_id(text: str) -> tuple[str, str] | None:
    """(repo id, revision; "main" when none is named) when ``text`` is spelled as a hub id."""
    match = HUB_ID.fullmatch(text)
    return None if match is None else (match["repo"], match["revision"] or "main")


def resolve_model(text: str, what: str, here: Path | None = None) -> Path:
    """The folder ``text`` names: a local path (relative to ``here``, else the working folder) when it exists or
    is not spelled as a hub id, else the hub id's snapshot in huggingface_hub's cache. Not in the cache while the
    hub cannot be reached: exit 3, naming what to fetch; no such repository or revision on a reachable hub: exit 2."""
    local = Path(here) / text if here is not None else Path(text)
    parsed = parse_hub_id(text)
    if parsed is None or os.path.lexists(local):
        return local
    repo, revision = parsed
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (IncompleteSnapshotError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    not_cached = EnvironmentProblem(
        f"{what} {text}: no such folder, and as a hub id, revision {revision!r} of {repo} is not (whole) in the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached: fetch it where it can (`hf download "
        f"{repo} --revision {revision}`), or point HF_HUB_CACHE at a cache that holds it")
    try:
        try:
            return Path(snapshot_download(repo, revision=revision, local_files_only=constants.HF_HUB_OFFLINE))
        except (httpx.ConnectError, httpx.TimeoutException, OfflineModeIsEnabled):
            # a commit named outright is looked up on the hub before the cache: unreachable, the cache alone answers
            return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        raise not_cached from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise BadInput(f"{what} {text}: {str(exc).splitlines()[0]}") from None


def hub_origin(folder: Path) -> dict | None:
    """{"repo_id", "commit"} when ``folder`` is a snapshot folder of huggingface_hub's cache, else None."""
    folder = Path(folder).absolute()
    repo_folder = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo_folder.startswith(REPO_FOLDER_PREFIX) or not COMMIT.fullmatch(folder.name):
        return None
    return {"repo_id": repo_folder[len(REPO_FOLDER_PREFIX):].replace("--", "/"), "commit": folder.name}


def output_stem(folder: Path) -> Path:
    """What outputs named after ``folder`` are named from: the folder itself, or for a hub snapshot (never
    written into) the repository's name in the working folder."""
    origin = hub_origin(folder)
    return Path(folder).absolute() if origin is None else Path.cwd() / origin["repo_id"].split("/")[1]
