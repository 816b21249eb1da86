"""Where the int8 transformer's image error comes from, on the demo model: one JSON line per configuration.

Issue 6 asks int8 + reuse + guidance interval for PSNR >= 28 dB to the default images (all images pooled) with the
demo classifier's score within 3 points. This measures the error budget behind that: the PSNR of each configuration
to the default fp32 images, pooled over all images (`psnr_db`, bench/speed.py's figure) and averaged per image
(`mean_image_psnr_db`, the literature's usual figure), the 10th percentile per image, and the score. Configurations:

- `int8`, `int8+cache-fast`, `cache-fast`, `guidance-late` (no guidance below σ 1.3), `guidance-first` (none at the
  first step), `int8+guidance-first+cache-fast`: the pipeline's own options;
- `int8-steps:A-B`: the int8 blocks at steps A..B only, the float ones elsewhere (which steps' int8 error matters);
- `fake:GROUP=ACT/W,...`: every block linear quantized in simulation (exact int arithmetic in fp32), activations per
  token with ACT levels (`s8` ±127, `s7` ±63; `f` float) and weights per channel in ±W (127, or 63 as AVX2's
  oneDNN kernel needs), one entry per group (`all`, `fc1`, `fc2`, `qkv`, `o1`, `q2`, `kv2`, `o2`; later entries win).

    python bench/int8_budget.py                                   # the default list, ~40 s per row on 2 cores
    python bench/int8_budget.py --configs int8 "fake:all=f/1e9,fc2=s8/63"
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pixart
from pixart.demo import MODEL
from pixart.demo.shapes import generate_all, score
from pixart.hardware import set_threads
from speed import FIRST_STEP_UNGUIDED

GROUPS = {"fc1": ("ff.net.0",), "fc2": ("ff.net.2",), "qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
          "o1": ("attn1.to_out",), "q2": ("attn2.to_q",), "kv2": ("attn2.to_k", "attn2.to_v"), "o2": ("attn2.to_out",)}
CALLS = {"cache-fast": {"cache": "fast"}, "guidance-late": {"guidance_interval": (1.3, 1e4)},
         "guidance-first": {"guidance_interval": FIRST_STEP_UNGUIDED}}
DEFAULT_CONFIGS = ["int8", "cache-fast", "int8+cache-fast", "guidance-late", "guidance-first",
                   "int8+guidance-first+cache-fast", "int8-steps:0-9", "int8-steps:10-19",
                   "fake:all=s8/63", "fake:all=s8/127",
                   *(f"fake:all=f/1e9,{g}=s8/63" for g in GROUPS)]


class FakeQuantLinear(nn.Module):
    """A linear layer computing what an int8 kernel would: per-token activations with `act_levels` levels each side
    (None: float), weights per output channel rounded to ±`weight_max`."""

    def __init__(self, linear: nn.Linear, act_levels: float | None, weight_max: float):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / weight_max
        self.weight = (w / scale).round().clamp(-weight_max, weight_max) * scale
        self.bias, self.act_levels = linear.bias, act_levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_levels is not None:
            scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / self.act_levels
            x = (x / scale).round().clamp(-self.act_levels, self.act_levels) * scale
        return F.linear(x, self.weight, self.bias)


def fake_quantized(pipe: pixart.PixArtAlphaPipeline, spec: str) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap the block linears for FakeQuantLinear per `spec` ("all=s8/63,fc2=f/1e9"); returns what to swap back."""
    modes = [entry.split("=") for entry in spec.split(",")]
    swapped = []
    for name, module in list(pipe.transformer.transformer_blocks.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        mode = None
        for group, layout in modes:
            if group == "all" or any(part in name for part in GROUPS[group]):
                mode = layout
        act, weight_max = mode.split("/")
        parent_name, _, leaf = name.rpartition(".")
        parent = pipe.transformer.transformer_blocks.get_submodule(parent_name)
        levels = {"s8": 127.0, "s7": 63.0, "f": None}[act]
        setattr(parent, leaf, FakeQuantLinear(module, levels, float(weight_max)))
        swapped.append((parent, leaf, module))
    return swapped


def measure(images, labels, default: np.ndarray) -> dict:
    arr = np.stack([np.asarray(image, dtype=np.float64) for image in images])
    mse = ((arr - default) ** 2).reshape(len(arr), -1).mean(1)
    per_image = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    return {"psnr_db": round(float(10 * np.log10(255.0**2 / mse.mean())), 2),
            "mean_image_psnr_db": round(float(per_image.mean()), 2),
            "p10_image_psnr_db": round(float(np.percentile(per_image, 10)), 2), "score": round(score(images, labels), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds per caption (54 captions)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    args = parser.parse_args()
    set_threads()
    seeds = tuple(range(args.seeds))

    def load(quantization=None) -> pixart.PixArtAlphaPipeline:
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(MODEL, torch_dtype=torch.float32,
                                                          transformer_quantization=quantization)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe, **kwargs):
        return generate_all(pipe, seeds=seeds, num_inference_steps=args.steps, output_type="pil", **kwargs)

    fp32, int8 = load(), load("int8")
    images, labels = run(fp32)
    default = np.stack([np.asarray(image, dtype=np.float64) for image in images])
    print(json.dumps({"config": "default", "images": len(images), "score": round(score(images, labels), 4)}),
          flush=True)
    float_blocks, int8_blocks = fp32.transformer.transformer_blocks, int8.transformer.transformer_blocks
    for config in args.configs:
        if config.startswith("fake:"):
            swapped = fake_quantized(fp32, config[len("fake:"):])
            try:
                line = measure(*run(fp32), default)
            finally:
                for parent, leaf, module in swapped:
                    setattr(parent, leaf, module)
        elif config.startswith("int8-steps:"):
            first, last = map(int, config[len("int8-steps:"):].split("-"))

            def blocks_for(step: int) -> nn.Module:
                return int8_blocks if first <= step <= last else float_blocks

            def swap(pipe, i, t, tensors):
                int8.transformer.transformer_blocks = blocks_for(i + 1)  # for the next step
                return tensors

            int8.transformer.transformer_blocks = blocks_for(0)
            try:
                line = measure(*run(int8, callback_on_step_end=swap), default)
            finally:
                int8.transformer.transformer_blocks = int8_blocks
        else:
            parts = config.split("+")
            pipe = int8 if parts[0] == "int8" else fp32
            kwargs = {k: v for part in parts if part != "int8" for k, v in CALLS[part].items()}
            line = measure(*run(pipe, **kwargs), default)
        print(json.dumps({"config": config, **line}), flush=True)


if __name__ == "__main__":
    main()
