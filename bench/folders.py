"""The real-size random-weight pipeline folders the benchmarks share, built once under bench/_cache.

T5-XXL stored in fp32 and sharded as on the Hub, PixArt XL-2 (bench/core.py's random transformers), the SD VAE,
a sentencepiece tokenizer and PixArt's scheduler config; the 512 and 256 folders link to the 1024 one's files
and differ only by their transformer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from core import CACHE, build_cache

FOLDER = CACHE / "pixart-xl-2-1024-ms-random"
SHARED = ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json")


def pipeline_folder(size: int = 1024, text_encoder: bool = True) -> Path:
    """The random-weight PixArt-XL-2 pipeline folder of `size` (256, 512 or 1024 pixels), built on first use;
    without `text_encoder`, its T5-XXL (19 GB) is written only if a later call asks for it."""
    build_cache()
    _build_1024()
    if text_encoder:
        _build_t5()
    if size == 1024:
        return FOLDER
    folder = CACHE / f"pixart-xl-2-{size}-random"
    if not (folder / "model_index.json").is_symlink():
        folder.mkdir(exist_ok=True)
        (folder / "transformer").unlink(missing_ok=True)
        (folder / "transformer").symlink_to(f"../transformer-{size}")  # relative: the cache may move
        for name in SHARED:  # model_index.json last: its presence marks a complete folder
            if not (folder / name).is_symlink():
                (folder / name).symlink_to(f"../{FOLDER.name}/{name}")
    return folder


def _build_1024() -> None:
    """The 1024-MS folder but its T5: links to the cached transformer and VAE, the tokenizer and scheduler."""
    if (FOLDER / "model_index.json").is_file():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import PIXART_SCHEDULER, train_spm

    FOLDER.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae"):
        src = CACHE / ("transformer-1024" if name == "transformer" else "vae")
        (FOLDER / name).mkdir(exist_ok=True)
        for f in src.iterdir():
            target = FOLDER / name / f.name
            if not target.exists():
                target.symlink_to(f.resolve())
    tok = FOLDER / "tokenizer"
    tok.mkdir(exist_ok=True)
    train_spm(tok)
    (tok / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                             "unk_token": "<unk>"}))
    (FOLDER / "scheduler").mkdir(exist_ok=True)
    (FOLDER / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DPMSolverMultistepScheduler", **PIXART_SCHEDULER}))
    (FOLDER / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))


def _build_t5() -> None:
    """T5-XXL in fp32, 25 shards as on the Hub, written tensor group by tensor group (never whole in memory); its
    index, written last, marks it complete."""
    from safetensors.torch import save_file

    te = FOLDER / "text_encoder"
    if (te / "model.safetensors.index.json").is_file():
        return
    te.mkdir(exist_ok=True)
    config = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_kv": 64, "d_ff": 10240,
              "num_layers": 24, "num_heads": 64, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
              "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "torch_dtype": "float32"}
    (te / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    weight_map, shard, shard_no = {}, {}, 0

    def flush():
        nonlocal shard, shard_no
        if shard:
            shard_no += 1
            name = f"model-{shard_no:05d}-of-00025.safetensors"
            save_file(shard, str(te / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard = {}

    shard["shared.weight"] = randn(32128, 4096, std=1.0)
    for i in range(24):
        p = f"encoder.block.{i}.layer."
        for n in "qkvo":
            shard[f"{p}0.SelfAttention.{n}.weight"] = randn(4096, 4096, std=4096**-0.5 if n != "q" else 4096**-1)
        if i == 0:
            shard[f"{p}0.SelfAttention.relative_attention_bias.weight"] = randn(32, 64, std=0.1)
        shard[f"{p}0.layer_norm.weight"] = torch.ones(4096)
        shard[f"{p}1.DenseReluDense.wi_0.weight"] = randn(10240, 4096, std=4096**-0.5)
        shard[f"{p}1.DenseReluDense.wi_1.weight"] = randn(10240, 4096, std=4096**-0.5)
        shard[f"{p}1.DenseReluDense.wo.weight"] = randn(4096, 10240, std=10240**-0.5)
        shard[f"{p}1.layer_norm.weight"] = torch.ones(4096)
        flush()  # one block per shard (24, then the final norm: 25): building never holds more than ~800 MB
    shard["encoder.final_layer_norm.weight"] = torch.ones(4096)
    flush()
    total = sum((te / f).stat().st_size for f in set(weight_map.values()))
    (te / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
