"""Peak GPU memory of a whole 1024² generation with an 8-bit T5 (random weights at the real sizes).

Writes a full-size folder (T5-XXL in bf16, XL-2-1024-MS, SD VAE; random weights made on the GPU) to --folder, then
generates one 1024² image per memory mode and prints one JSON line each with torch.cuda.max_memory_allocated.

    python bench/vram.py --folder /tmp/pixart-random --steps 20 --memory staged full
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import PIXART_SCHEDULER, train_spm  # noqa: E402

import pixart  # noqa: E402
from pixart.configs import T5Config, TransformerConfig, VAEConfig  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = (T5Config(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2),  # --tiny: a smoke test of this script
        TransformerConfig(num_layers=2, num_attention_heads=2, caption_channels=64, cross_attention_dim=144),
        VAEConfig(block_out_channels=(32, 32, 32, 32), norm_num_groups=8))


def random_state(model: torch.nn.Module, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random bf16 weights for every parameter of a meta-built model, drawn on the GPU."""
    out = {}
    for name, p in model.state_dict().items():
        t = torch.randn(p.shape, device=DEVICE, dtype=torch.bfloat16) * std
        if name.endswith(("layer_norm.weight", "norm1.weight", "norm2.weight", "norm.weight")):
            t = torch.ones_like(t)
        out[name] = t.cpu()
    return out


def build(folder: Path, tiny: bool) -> None:
    if (folder / "model_index.json").is_file():
        return
    t5, transformer, vae = TINY if tiny else (T5Config(), TransformerConfig(), VAEConfig())
    for name, cls, config, weights in (
        ("text_encoder", pixart.T5EncoderModel, t5, "model.safetensors"),
        ("transformer", pixart.PixArtTransformer2DModel, transformer, "diffusion_pytorch_model.safetensors"),
        ("vae", pixart.AutoencoderKL, vae, "diffusion_pytorch_model.safetensors"),
    ):
        with torch.device("meta"):
            model = cls(config)
        (folder / name).mkdir(parents=True, exist_ok=True)
        config.save(folder / name / "config.json")
        save_file(random_state(model), str(folder / name / weights))
    (folder / "tokenizer").mkdir(exist_ok=True)
    train_spm(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DPMSolverMultistepScheduler", **PIXART_SCHEDULER}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/tmp/pixart-random"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--memory", nargs="+", default=["staged", "full"])
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    start = time.perf_counter()
    build(args.folder, args.tiny)
    print(json.dumps({"built_s": round(time.perf_counter() - start, 1)}), flush=True)
    for memory in args.memory:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(args.folder, torch_dtype=torch.bfloat16, device=DEVICE,
                                                          memory=memory, text_encoder_quantization=args.quantization)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        image = pipe("A small cactus with a happy face in the Sahara desert.", num_inference_steps=args.steps,
                     height=args.size, width=args.size, generator=torch.Generator(DEVICE).manual_seed(0), output_type="np").images
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
        print(json.dumps({"memory": memory, "text_encoder": args.quantization, "size": list(image.shape[1:3]),
                          "steps": args.steps, "peak_vram_gb": round(peak, 2),
                          "load_s": round(loaded - start, 1), "generate_s": round(time.perf_counter() - loaded, 1),
                          "finite": bool((image == image).all())}), flush=True)
        del pipe


if __name__ == "__main__":
    main()
