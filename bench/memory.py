"""Peak RSS and time of a whole generation at the real PixArt-α sizes (random weights), per memory configuration.

Builds once, on disk, a full-size pipeline folder with random weights: T5-XXL stored in fp32 and sharded as on
the Hub, XL-2-1024-MS, the SD VAE, a sentencepiece tokenizer and PixArt's scheduler config. Then each
configuration runs one generation in a fresh process under /usr/bin/time -v (peak RSS counts every touched
page, file-backed ones included) and prints one JSON line.

    python bench/memory.py                                   # 1024², 2 steps, every configuration
    python bench/memory.py --size 256 --steps 1 --configs pixart-bf16-staged diffusers-bf16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / "_cache"
FOLDER = CACHE / "pixart-xl-2-1024-ms-random"
PROMPT = "A small cactus with a happy face in the Sahara desert."
CONFIGS = {  # name -> (engine, dtype, memory, text-encoder quantization)
    "pixart-bf16-full": ("pixart", "bf16", "full", None),
    "pixart-bf16-staged": ("pixart", "bf16", "staged", None),
    "pixart-int8-staged": ("pixart", "bf16", "staged", "int8"),
    "pixart-int4-staged": ("pixart", "bf16", "staged", "int4"),
    "diffusers-bf16": ("diffusers", "bf16", None, None),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_folder() -> None:
    """The full-size folder, written tensor group by tensor group so building it never holds T5-XXL whole."""
    if (FOLDER / "model_index.json").is_file():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import PIXART_SCHEDULER, train_spm
    from core import build_cache  # the random transformer and VAE of bench/core.py
    from safetensors.torch import save_file

    build_cache()
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
    te = FOLDER / "text_encoder"
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
    (FOLDER / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))


def worker(config: str, size: int, steps: int, dtype_override: str | None) -> dict:
    """One generation with `config`, in this (fresh) process; returns the seconds it took."""
    engine, dtype, memory, quant = CONFIGS[config]
    dtype = dtype_override or dtype
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    kwargs = dict(num_inference_steps=steps, height=size, width=size, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    if engine == "pixart":
        import pixart

        extra = {"text_encoder_quantization": quant} if quant else {}
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(FOLDER, torch_dtype=DTYPES[dtype], memory=memory, **extra)
    else:
        from diffusers import PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline.from_pretrained(FOLDER, torch_dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, **kwargs).images
    assert image.shape == (1, size, size, 3)
    return {"seconds": round(time.perf_counter() - start, 1), "finite": bool((image == image).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="compute dtype for every configuration (default: each one's own, bf16); fp32 where "
                             "the CPU has no native bf16 and bf16 would take hours")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.steps, args.dtype)))
        return
    build_folder()
    for config in args.configs:
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--worker", config, "--size", str(args.size),
               "--steps", str(args.steps)] + (["--dtype", args.dtype] if args.dtype else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        result = {"config": config, "dtype": args.dtype or CONFIGS[config][1], "size": f"{args.size}x{args.size}",
                  "steps": args.steps, "rc": proc.returncode,
                  "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            result.update(json.loads(lines[-1]))
        else:
            own = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("\t")]
            result["error"] = own[-1][:300] if own else "no output"  # the last line that is not /usr/bin/time's
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
