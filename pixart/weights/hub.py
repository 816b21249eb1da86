"""Turn a local path or a Hugging Face Hub id into a local folder (cache first, then download)."""
from __future__ import annotations

import os
from pathlib import Path

from .. import demo


def resolve(
    path_or_id: str | os.PathLike, subfolder: str | None = None, components: list[str] | None = None, **hub_kwargs
) -> Path:
    """A local folder for `path_or_id` ("demo": the shipped demo model); Hub ids come from the cache, or are
    downloaded when online.

    Only the files we read are fetched: the configs, safetensors weights and tokenizer files of `components`
    (or of `subfolder`, or of the whole repository)."""
    if str(path_or_id) == demo.NAME:
        if not (demo.MODEL / "model_index.json").is_file():
            raise FileNotFoundError(f"the demo model is missing from this installation ({demo.MODEL}): rebuild it with "
                                    "`python scripts/build_demo.py`")
        return demo.MODEL / subfolder if subfolder else demo.MODEL
    local = Path(path_or_id).expanduser()
    if local.exists():
        return local / subfolder if subfolder else local
    repo_id = str(path_or_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a Hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    folders = [subfolder] if subfolder else components
    prefixes = [f"{f}/" for f in folders] if folders else [""]
    patterns = ["model_index.json"] + [p + ext for p in prefixes for ext in ("*.json", "*.safetensors", "*.model")]
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}

    def snapshot(**kw) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs, **kw))

    try:
        folder = snapshot(local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        try:
            folder = snapshot()
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"{repo_id} is not a model on the Hugging Face Hub (check the spelling)") from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise FileNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache and cannot be downloaded ({type(e).__name__}). "
                f"Fix: connect to the network (and unset HF_HUB_OFFLINE), or run `huggingface-cli download {repo_id}` "
                "on a machine that has it and copy the folder here, then pass its path"
            ) from None
    return folder / subfolder if subfolder else folder
