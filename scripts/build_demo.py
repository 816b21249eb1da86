"""Rebuild the demo model (pixart/demo/model) from scratch, deterministically, in stages.

    python scripts/build_demo.py                        # every stage, then the folder is copied to --out
    python scripts/build_demo.py --stage vae --work W   # one stage; later stages read what earlier ones wrote in W

data: the synthetic shapes dataset (PNG + .txt captions). text: a sentencepiece tokenizer trained on the captions and
a tiny random T5 (frozen: it is never trained). vae: a small AutoencoderKL trained on the dataset (2 minutes on a
GPU; hours on a busy CPU), its scaling_factor set to 1/std of the latents. extract: `pixart extract` of the dataset.
transformer: `pixart train` from scratch at learning rate 1e-3, then runs from the previous run's EMA weights at 2e-4
(one per --anneal-steps value; larger step counts continue the runs' checkpoints), scored with the shapes classifier
on the 54 captions x 2 seeds (a warning below 90%); the folder is copied to --out. The shipped transformer (patch 2,
width 128, 6 blocks, 1.8M parameters) took 2345 + 1079 + 2117 steps of 256 (1.42M samples) on an H100, 6 minutes;
a 2-core CPU trains it at ~85 samples/s (4.6 hours). `--train-time`/`--anneal-time` stop runs after a duration instead.
Deterministic on one machine and device: the data and T5 bit for bit, the tokenizer piece for piece.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pixart.components import COMPONENTS
from pixart.configs import T5Config, TransformerConfig, VAEConfig
from pixart.demo import shapes
from pixart.models.t5 import T5EncoderModel
from pixart.models.vae import AutoencoderKL
from pixart.pipeline import PixArtAlphaPipeline
from pixart.train.model import RAW_VARIANT

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("data", "text", "vae", "extract", "transformer")
MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# PixArt-α's scheduler_config.json (DPM-Solver++ 2M), the keys diffusers' DPMSolverMultistepScheduler takes
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None, "solver_order": 2,
    "prediction_type": "epsilon", "thresholding": False, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
    "lower_order_final": True, "use_karras_sigmas": False, "timestep_spacing": "linspace", "steps_offset": 0,
    "final_sigmas_type": "zero", "variance_type": None,
}
VOCAB = 96  # BPE pieces: every caption word is one piece, other words fall back to letters
T5 = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, torch_dtype="float32")
# 8x down, 4 latent channels; narrow at full resolution, where decoding costs the most
VAE = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=128,
                scaling_factor=1.0)
HEAD_DIM = 32


def transformer_config(patch_size: int, width: int, depth: int) -> TransformerConfig:
    """The demo transformer: 16x16 latents, heads of 32, no micro-conditions."""
    if width % HEAD_DIM:
        raise SystemExit(f"--width {width} is not a multiple of the head size {HEAD_DIM}")
    return TransformerConfig(sample_size=16, patch_size=patch_size, num_attention_heads=width // HEAD_DIM,
                             attention_head_dim=HEAD_DIM, num_layers=depth, cross_attention_dim=width,
                             caption_channels=T5.d_model)


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def stage_data(work: Path, count: int, seed: int) -> None:
    shapes.write_dataset(work / "data", count, seed)
    log(f"data: {count} images in {work / 'data'}")


def stage_text(work: Path, seed: int) -> None:
    """Tokenizer trained on the 54 captions; a random T5 encoder saved in transformers' layout."""
    import sentencepiece as spm

    folder = work / "model"
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    captions = [shapes.caption(label) for label in shapes.labels()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_prefix=str(tokenizer / "spiece"), vocab_size=VOCAB, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (tokenizer / "spiece.vocab").unlink()
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (tokenizer / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "spiece.model"))
    split = [c for c in captions if len(sp.encode(c)) != len(c.split())]
    if split:
        raise SystemExit(f"the tokenizer splits caption words: {split[:3]}; raise VOCAB")
    write_tokenizer_json(sp, tokenizer / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "extra_ids": 0, "model_max_length": 120, **special}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    torch.manual_seed(seed)
    T5EncoderModel(T5).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    log(f"text: tokenizer ({VOCAB} pieces) and T5 (d_model {T5.d_model}) in {folder}")


def write_tokenizer_json(sp, path: Path) -> None:
    """The sentencepiece BPE model as a `tokenizers` BPE tokenizer.json (merges: every vocabulary piece that is the
    concatenation of two others, in vocabulary order), for transformers: its T5Tokenizer reads any spiece.model as a
    Unigram model and splits "black" into "▁bl" + "ack", so model_index.json names PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    ids = {piece: i for i, piece in enumerate(pieces)}
    plain = [p for p in pieces if not (sp.is_control(ids[p]) or sp.is_unknown(ids[p]))]
    merges = sorted((ids[a + b], a, b) for a in plain for b in plain if a + b in ids)
    tok = Tokenizer(models.BPE(ids, [(a, b) for _, a, b in merges], unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", ids["</s>"])])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(path))
    captions = [shapes.caption(label) for label in shapes.labels()]
    wrong = [c for c in captions if tok.encode(c).ids != [*sp.encode(c), ids["</s>"]]]
    if wrong:
        raise SystemExit(f"tokenizer.json disagrees with spiece.model on {wrong[:3]}")


def load_images(folder: Path, count: int | None = None) -> torch.Tensor:
    """The dataset's PNGs as uint8 (N, 3, 128, 128)."""
    files = sorted(folder.glob("*.png"))[:count]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def stage_vae(work: Path, seed: int, steps: int, batch: int, kl_weight: float, device: str) -> None:
    """Train the VAE (L1 + MSE + a small KL), set scaling_factor = 1/std(latents), check the reconstructions."""
    images = load_images(work / "data").to(device)
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAE).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    order = torch.Generator(device).manual_seed(seed)
    start = time.time()
    for step in range(steps):
        x = to_unit(images[torch.randint(len(images), (batch,), generator=order, device=device)])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(order)).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f} "
                f"({(time.time() - start) / (step + 1):.3f} s/step)")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit(x)).latent_dist.mean for x in images[:1024].split(64)])
        scaling = 1.0 / latents.std().item()
        held_out = [shapes.sample(i, seed + 1) for i in range(216)]
        x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for _, im in held_out]).to(device)
        recs = [im for chunk in x.split(54) for im in to_pil(vae(to_unit(chunk)).sample.cpu())]
    score = shapes.score(recs, [label for label, _ in held_out])
    vae.config = vae.config.replace(scaling_factor=round(scaling, 5))
    vae.cpu().save_pretrained(work / "model" / "vae")
    log(f"vae: latent std {1 / scaling:.3f} -> scaling_factor {scaling:.5f}; classifier on 216 held-out "
        f"reconstructions {score:.1%}")
    if score < 0.98:
        raise SystemExit(f"the VAE reconstructions score {score:.1%} < 98%: train it longer (--vae-steps)")


def pixart(*args: str, procs: int = 1) -> None:
    """Run a `pixart` subcommand of this checkout, under torchrun when `procs` > 1."""
    torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={procs}"] if procs > 1 else []
    cmd = [sys.executable, *torchrun, "-m", "pixart", *map(str, args)]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def stage_extract(work: Path, args: argparse.Namespace) -> None:
    """The transformer's config (extract reads its sample size), then T5 features and VAE posteriors of the dataset."""
    (work / "model" / "transformer").mkdir(exist_ok=True)
    transformer_config(args.patch_size, args.width, args.depth).save(work / "model" / "transformer" / "config.json")
    pixart("extract", work / "data", "--model", work / "model", "-o", work / "features", "--device", args.device,
           "--dtype", "fp32", "--quiet", procs=args.procs)


def stage_transformer(work: Path, out: Path, args: argparse.Namespace) -> None:
    """`pixart train` from scratch at a high learning rate, then on from the EMA weights at a low one (annealing: the
    shapes sharpen); the 54-caption score of the result, and the folder copied to `out`."""
    run = train_run(work, args.run, args.train_steps, args.train_time, args.lr, args.warmup_steps, args.ema_decay,
                    args.seed, args)
    times = args.anneal_time or [None] * len(args.anneal_steps)
    if len(times) != len(args.anneal_steps):
        raise SystemExit(f"--anneal-time needs one duration per --anneal-steps value ({len(args.anneal_steps)})")
    for k, (steps, seconds) in enumerate(zip(args.anneal_steps, times), 1):
        run = train_run(work, f"{args.run}-anneal" + (str(k) if k > 1 else ""), steps, seconds, args.anneal_lr, 50,
                        args.anneal_ema_decay, args.seed + k, args, start=run)
    pipe = PixArtAlphaPipeline.from_pretrained(run, device=args.device)
    images, labels = shapes.generate_all(pipe)
    score = shapes.score(images, labels)
    sheet = Image.new("RGB", (128 * 12, 128 * 9))
    for i, image in enumerate(images):
        sheet.paste(image, (128 * (i % 12), 128 * (i // 12)))
    sheet.save(work / f"samples-{args.run}.png")
    (work / f"score-{args.run}.json").write_text(json.dumps({"score": score, **vars(args)}, default=str) + "\n")
    log(f"transformer: classifier score on the 54 captions x 2 seeds: {score:.1%}")
    publish(run, out)
    if score < 0.9:
        log(f"WARNING: {score:.1%} is below issue 4's 90%: train longer (larger --train-steps / --anneal-steps "
            "continue the runs)")


def train_run(work: Path, name: str, steps: int, seconds: str | None, lr: float, warmup: int, ema_decay: float,
              seed: int, args: argparse.Namespace, start: Path | None = None) -> Path:
    """`pixart train` into work/train-NAME: from scratch (--patch-size, --width, --depth), or from the pipeline
    folder `start`; for `steps`, or until `seconds` of training (then the step count reached is logged)."""
    run = work / f"train-{name}"
    resume = ["--resume", "auto"] if (run / "checkpoints").is_dir() else []  # a larger step count continues
    origin = []
    if start is None:
        origin = ["--config", work / f"config-{name}.json"]
        transformer_config(args.patch_size, args.width, args.depth).save(origin[1])
    limit = ["--max-time", seconds] if seconds else []
    pixart("train", work / "features", "-o", run, "--model", start or work / "model", *origin,
           "--batch-size", args.batch_size, "--max-steps", steps, "--lr", lr, "--warmup-steps", warmup,
           "--grad-clip", 1.0, "--ema-decay", ema_decay, "--caption-dropout", 0.1, "--seed", seed,
           "--mixed-precision", args.mixed_precision, "--device", args.device, "--sample-every", 0,
           "--checkpoint-every", 250, "--log-every", 50, *limit, *resume, procs=args.procs)
    return run


def publish(folder: Path, out: Path) -> None:
    """Copy the pipeline folder's files that the model needs to `out`, checking the total stays under 30 MB."""
    raw = f"diffusion_pytorch_model.{RAW_VARIANT}.safetensors"  # the weights before EMA
    parts = [p for c in COMPONENTS for p in sorted((folder / c).iterdir()) if p.name != raw]
    files = [folder / "model_index.json", *parts]
    total = sum(p.stat().st_size for p in files)
    if total > 30e6:
        raise SystemExit(f"the demo model takes {total / 1e6:.1f} MB > 30 MB")
    shutil.rmtree(out, ignore_errors=True)
    for p in files:
        target = out / p.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    log(f"published {len(files)} files, {total / 1e6:.2f} MB, to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=(*STAGES, "all"), nargs="+", default=["all"])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo", help="intermediate files")
    parser.add_argument("--out", type=Path, default=ROOT / "pixart" / "demo" / "model", help="the finished folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=54 * 80)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="a larger one blurs the reconstructions")
    parser.add_argument("--run", default="main", help="name of the training run (train-RUN/ in --work)")
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=128, help="the transformer's width (heads of 32)")
    parser.add_argument("--depth", type=int, default=6, help="the transformer's blocks")
    parser.add_argument("--train-steps", type=int, default=2345, help="steps of the first run (from scratch)")
    parser.add_argument("--train-time", default=None, help="or a training time (as pixart train --max-time)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995, help="short runs need a short average: 0.999 "
                        "would still hold 13%% of the random initialisation after 2000 steps")
    parser.add_argument("--anneal-steps", type=int, nargs="+", default=[1079, 2117], help="steps of each further "
                        "run, from the previous one's EMA weights (the shipped model's)")
    parser.add_argument("--anneal-time", nargs="+", default=None, help="or training times of those runs")
    parser.add_argument("--anneal-lr", type=float, default=2e-4)
    parser.add_argument("--anneal-ema-decay", type=float, default=0.998)
    parser.add_argument("--procs", type=int, default=1, help="extract and train processes (torchrun); on a busy "
                        "CPU, 2 processes of 1 thread outrun 1 of 2 threads")
    args = parser.parse_args()
    stages = STAGES if "all" in args.stage else args.stage
    if "data" in stages:
        stage_data(args.work, args.images, args.seed)
    if "text" in stages:
        stage_text(args.work, args.seed)
    if "vae" in stages:
        stage_vae(args.work, args.seed, args.vae_steps, args.vae_batch, args.kl_weight, args.device)
    if "extract" in stages:
        stage_extract(args.work, args)
    if "transformer" in stages:
        stage_transformer(args.work, args.out, args)


if __name__ == "__main__":
    main()
