"""Cosine similarity of int8 / int4 T5 embeddings to the bf16 and fp32 ones, on every line of the test prompts.

The encoder is a folder given by --model (the real T5-XXL for those who have it; a pipeline folder with
--subfolder text_encoder) or, by default, a random-weight T5 v1.1 with XXL's proportions at a smaller size
(transformers' initialisation, built once under bench/_cache; random XXL would be 19 GB: --d-model 4096
--layers 24). Quality numbers from random weights are not those of the real model: say so when you quote them.
One JSON line per (prompt, quantization, dtype), then one summary line per (quantization, dtype) with the mean
and minimum over all real tokens, the median encode time and the model's bytes. `--linear` instead times one
4096 -> 10240 linear layer at 120 tokens (T5-XXL's wi), dense vs int8 vs int4, in fp32 and bf16.

    python bench/quant_quality.py                              # random d_model 1024, 4 layers
    python bench/quant_quality.py --d-model 2048 --layers 8
    python bench/quant_quality.py --model PixArt-alpha/PixArt-XL-2-1024-MS --subfolder text_encoder
    python bench/quant_quality.py --linear
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pixart.models.t5 import T5EncoderModel
from pixart.quant import QUANTIZATIONS
from pixart.tokenizer import T5Tokenizer

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "_cache"
PROMPTS = ROOT.parent / "tests" / "data" / "prompts.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_t5(d_model: int, layers: int) -> Path:
    """A random T5 v1.1 encoder with XXL's proportions (d_ff 2.5 d_model, heads of 64), saved by transformers."""
    folder = CACHE / f"t5-random-{d_model}x{layers}"
    if not (folder / "config.json").is_file():
        import transformers

        config = transformers.T5Config(d_model=d_model, d_ff=d_model * 5 // 2, d_kv=64, num_heads=d_model // 64,
                                       num_layers=layers, feed_forward_proj="gated-gelu", vocab_size=32128)
        torch.manual_seed(0)
        transformers.T5EncoderModel(config).save_pretrained(folder)
    return folder


def trained_tokenizer() -> Path:
    """A sentencepiece tokenizer trained on the prompts, T5's special ids (pad 0, eos 1, unk 2)."""
    folder = CACHE / "spiece-prompts"
    if not (folder / "spiece.model").is_file():
        import sentencepiece

        folder.mkdir(parents=True, exist_ok=True)
        lines = [line.lower() for line in PROMPTS.read_text().splitlines() if line.strip()] * 4
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=300, pad_id=0, eos_id=1,
            unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0, minloglevel=2,
        )
    return folder


def encode(model: T5EncoderModel, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    """fp32 embeddings (B, L, D) of all prompts in one batch, and the median seconds of `repeats` runs."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(ids, mask)[0]
            times.append(time.perf_counter() - start)
    return out.float(), statistics.median(times)


def quality(args: argparse.Namespace) -> None:
    folder = Path(args.model) if args.model else random_t5(args.d_model, args.layers)
    tokenizer = T5Tokenizer.from_pretrained(args.tokenizer or trained_tokenizer())
    prompts = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
    batch = tokenizer(prompts, max_length=120)
    ids, mask = batch.input_ids, batch.attention_mask
    real = mask.bool()
    references: dict[str, torch.Tensor] = {}
    # the float references first, so every quantized run is compared with both
    runs = [(d, None) for d in args.dtypes] + [(d, q) for d in args.dtypes for q in QUANTIZATIONS]
    for dtype_name, quantization in runs:
        model = T5EncoderModel.from_pretrained(folder, subfolder=args.subfolder, torch_dtype=DTYPES[dtype_name],
                                               quantization=quantization)
        nbytes = sum(p.nbytes for p in model.parameters())
        out, seconds = encode(model, ids, mask, args.repeats)
        del model
        name = quantization or "none"
        if quantization is None:
            references[dtype_name] = out
        cosines = {ref: F.cosine_similarity(out, emb, dim=-1) for ref, emb in references.items() if emb is not out}
        for i in range(len(prompts)):
            line = {"prompt": i, "quantization": name, "dtype": dtype_name, "tokens": int(real[i].sum())}
            for ref, cos in cosines.items():
                line |= {f"cos_{ref}_mean": round(cos[i][real[i]].mean().item(), 6),
                         f"cos_{ref}_min": round(cos[i][real[i]].min().item(), 6)}
            print(json.dumps(line), flush=True)
        summary = {"summary": True, "quantization": name, "dtype": dtype_name, "model": str(folder),
                   "random_weights": args.model is None, "prompts": len(prompts), "tokens": int(real.sum()),
                   "model_gb": round(nbytes / 1e9, 3), "encode_s": round(seconds, 3)}
        for ref, cos in cosines.items():
            summary |= {f"cos_{ref}_mean": round(cos[real].mean().item(), 6),
                        f"cos_{ref}_min": round(cos[real].min().item(), 6)}
        print(json.dumps(summary), flush=True)


def linear_speed(args: argparse.Namespace) -> None:
    """ms per forward of T5-XXL's wi (4096 -> 10240) at 120 tokens: dense vs int8 vs int4, per activation dtype."""
    torch.manual_seed(0)
    weight = torch.randn(10240, 4096) * 4096 ** -0.5
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        x = torch.randn(1, 120, 4096, dtype=dtype)
        layers = {"none": lambda x, w=weight.to(dtype): F.linear(x, w)}
        for name, spec in QUANTIZATIONS.items():
            layer = spec.linear(4096, 10240)
            for key, t in layer.quantize(weight, dtype).items():
                setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
            layers[name] = layer
        seconds = {}
        for name, layer in layers.items():
            with torch.inference_mode():
                layer(x)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    layer(x)
                    times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times)
            print(json.dumps({"linear": "4096x10240", "tokens": 120, "quantization": name, "dtype": dtype_name,
                              "threads": torch.get_num_threads(), "ms": round(seconds[name] * 1e3, 1),
                              "vs_dense": round(seconds[name] / seconds["none"], 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a T5 encoder folder or Hub id (default: a random T5, built once)")
    parser.add_argument("--subfolder", help="e.g. text_encoder, when --model is a pipeline")
    parser.add_argument("--tokenizer", help="a folder with spiece.model (default: one trained on the prompts)")
    parser.add_argument("--d-model", type=int, default=1024, help="random T5: width (XXL: 4096)")
    parser.add_argument("--layers", type=int, default=4, help="random T5: blocks (XXL: 24)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--linear", action="store_true", help="time one XXL-sized linear layer instead")
    args = parser.parse_args()
    if args.linear:
        linear_speed(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
