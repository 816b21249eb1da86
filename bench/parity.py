"""Whole-pipeline parity with diffusers on any device (the GPU check of the test suite's CPU parity tests).

Builds the tiny diffusers-saved folders of tests/conftest.py, runs pixart and diffusers on the same folder with the
same seed, and prints one JSON line per case: max |Δ| of [0, 1] images (fp32 bound: 2e-3, as the tests).

    python bench/parity.py --device cuda --dtypes fp32 fp16 bf16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_pipeline_folder, train_spm  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = {
    128: [dict(prompt="A small cactus with a happy face in the Sahara desert."),
          dict(prompt="crocodile in a sweater", height=700, width=1200)],
    64: [dict(prompt="a red circle on a white background", height=300, width=520, num_inference_steps=3),
         dict(prompt="artistic", height=256, width=128, use_resolution_binning=False),
         dict(prompt=["a boy and a girl fall in love", "crocodile"], num_images_per_prompt=2, height=256, width=256,
              negative_prompt="low quality")],
}


def main() -> None:
    from diffusers import PixArtAlphaPipeline as Reference

    import pixart

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    spm = train_spm(root)
    for sample_size, cases in CASES.items():
        folder = build_pipeline_folder(root, spm, sample_size)
        for name in args.dtypes:
            dtype = DTYPES[name]
            ours = pixart.PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=dtype).to(args.device)
            ref = Reference.from_pretrained(folder, torch_dtype=dtype).to(args.device)
            for pipe in (ours, ref):
                pipe.set_progress_bar_config(disable=True)
            for case in cases:
                kwargs = {"num_inference_steps": 2, "output_type": "np", **case}
                a = ours(generator=torch.Generator(args.device).manual_seed(0), **kwargs).images
                try:
                    b = ref(generator=torch.Generator(args.device).manual_seed(0), **kwargs).images
                    diff = float(abs(a - b).max())
                except Exception as e:  # a diffusers failure is a finding of the run, reported as such
                    b, diff = None, f"diffusers failed: {type(e).__name__}: {e}"[:200]
                print(json.dumps({"device": args.device, "dtype": name, "sample_size": sample_size,
                                  "case": {k: v for k, v in case.items() if k != "prompt"}, "shape": list(a.shape),
                                  "pixart_finite": bool((a == a).all()), "max_abs_diff": diff}), flush=True)


if __name__ == "__main__":
    main()
