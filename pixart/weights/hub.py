"""Turn a local path or a Hugging Face Hub id into a local folder (cache first, then download)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import demo


# from_pretrained's keywords for huggingface_hub (where and how to fetch), and diffusers' loading options that change
# nothing here (safetensors are preferred anyway, loading is always lazy)
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")
IGNORED_KWARGS = ("use_safetensors", "low_cpu_mem_usage", "device_map_kwargs", "resume_download")


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the Hub keywords out of `kwargs` (and drop the ignored ones): what stays is the caller's own."""
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    return {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}


def resolve(
    path_or_id: str | os.PathLike, subfolder: str | None = None, components: list[str] | None = None,
    variant: str | None = None, **hub_kwargs
) -> Path:
    """A local folder for `path_or_id` ("demo": the shipped demo model); Hub ids come from the cache, or are
    downloaded when online.

    Only the files we read are fetched: the configs, safetensors weights and tokenizer files of `components`
    (or of `subfolder`, or of the whole repository); with a `variant` (fp16, ...), only that variant's weights."""
    if str(path_or_id) == demo.NAME:
        if not (demo.MODEL / "model_index.json").is_file():
            raise FileNotFoundError(f"the demo model is missing from this installation ({demo.MODEL}): rebuild it with "
                                    "`python scripts/build_demo.py`")
        return demo.MODEL / subfolder if subfolder else demo.MODEL
    local = Path(path_or_id).expanduser()
    if local.is_file():
        raise NotADirectoryError(_file_given(local))
    if local.exists():
        return local / subfolder if subfolder else local
    repo_id = str(path_or_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a Hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    folders = [subfolder] if subfolder else components
    prefixes = [f"{f}/" for f in folders] if folders else [""]
    # a variant's weights: model.fp16.safetensors, its shards model.fp16-00001-of-00002.safetensors (and the
    # deprecated model-00001-of-00002.fp16.safetensors); the shard index is a *.json
    weights = [f"*.{variant}.safetensors", f"*.{variant}-*.safetensors"] if variant else ["*.safetensors"]
    patterns = ["model_index.json"] + [p + ext for p in prefixes for ext in ("*.json", "*.model", *weights)]
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    local_only = bool(hub_kwargs.pop("local_files_only", False))

    def snapshot(**kw) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs, **kw))

    try:
        if hub_kwargs.get("force_download") and not local_only:
            raise LocalEntryNotFoundError("force_download: the cache is not read")
        folder = snapshot(local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        if local_only:
            raise FileNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache, and local_files_only=True forbids downloading it. "
                f"Fix: run once with the network (without local_files_only), or `huggingface-cli download {repo_id}`"
                ", or pass the path of a local folder"
            ) from None
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


def _file_given(path: Path) -> str:
    """Why a file is not a model, and what to pass instead."""
    folder = f"pass the folder that holds it ({path.parent}) or a Hub id"
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        return f"{path} is a file, not a model folder: {folder}"
    return (f"{path} is a weight file, not a model folder: from_pretrained reads a diffusers folder (config.json "
            f"next to the weights) or a Hub id. Fix: {folder}; for a single PixArt transformer checkpoint, load it "
            f"with `transformer = PixArtTransformer2DModel.from_single_file({str(path)!r})`, then "
            "`PixArtAlphaPipeline.from_pretrained(<a pipeline folder or Hub id>, transformer=transformer)`")
