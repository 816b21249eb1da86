"""Turn a local path or a Hugging Face Hub id into a local folder (cache first, then download)."""
from __future__ import annotations

import os
from pathlib import Path


def resolve(path_or_id: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local folder for `path_or_id`; Hub ids come from the cache, or are downloaded when online."""
    local = Path(path_or_id).expanduser()
    if local.exists():
        return local / subfolder if subfolder else local
    repo_id = str(path_or_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a Hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{subfolder}/*"] if subfolder else None
    patterns = patterns + ["model_index.json"] if patterns else None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"{repo_id} is not a model on the Hugging Face Hub (check the spelling)") from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise FileNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache and cannot be downloaded ({type(e).__name__}). "
                f"Fix: connect to the network (and unset HF_HUB_OFFLINE), or run `huggingface-cli download {repo_id}` "
                "on a machine that has it and copy the folder here, then pass its path"
            ) from None
    return folder / subfolder if subfolder else folder
