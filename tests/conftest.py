"""Tiny PixArt-α pipeline folders built and saved by diffusers, transformers and sentencepiece themselves."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.txt"  # a copy of ../shared/prompts.txt
# PixArt's scheduler/scheduler_config.json (DPM-Solver++ 2M as the published folders configure it)
PIXART_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, prediction_type="epsilon",
    timestep_spacing="linspace", final_sigmas_type="zero", use_karras_sigmas=False, thresholding=False,
)
SPM_EXTRA_IDS = 100


def prompt_lines() -> list[str]:
    """The project's test prompts (tests/data/prompts.txt)."""
    return [line for line in PROMPTS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def spm_file(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


def train_spm(folder: Path) -> Path:
    """A sentencepiece unigram model trained on the test prompts, with T5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    lines = [p.lower() for p in prompt_lines()] * 4 + ["a red circle on a white background", "the quick brown fox"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=300, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0, minloglevel=2,
    )
    return folder / "spiece.model"


def build_pipeline_folder(root: Path, spm_file: Path, sample_size: int, seed: int = 0) -> Path:
    """Save a tiny PixArtAlphaPipeline with diffusers' own save_pretrained (T5 and tokenizer via transformers)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    tok_dir = root / "_spm"
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_file, tok_dir / "spiece.model")
    tokenizer = T5Tokenizer.from_pretrained(str(tok_dir), extra_ids=SPM_EXTRA_IDS)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, num_attention_heads=2, attention_head_dim=24, in_channels=4,
        out_channels=8, caption_channels=32, cross_attention_dim=48, patch_size=2,  # inner 48: divisible by 3 for micro-conditions
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers; random values make the test meaningful
        for p in transformer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=64,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    folder = root / f"pixart-{sample_size}"
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler).save_pretrained(folder)
    shutil.copy(spm_file, folder / "tokenizer" / "spiece.model")  # the published folders ship spiece.model
    return folder


@pytest.fixture(scope="session")
def pipeline_dir_1024(tmp_path_factory, spm_file) -> Path:
    """sample_size 128: micro-conditions on, the 1024 bins."""
    return build_pipeline_folder(tmp_path_factory.mktemp("pipe"), spm_file, 128)


@pytest.fixture(scope="session")
def pipeline_dir_512(tmp_path_factory, spm_file) -> Path:
    """sample_size 64: no micro-conditions, the 512 bins."""
    return build_pipeline_folder(tmp_path_factory.mktemp("pipe"), spm_file, 64, seed=1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test (and the processes it starts) uses its own prompt-embedding cache, never ~/.cache."""
    monkeypatch.setenv("PIXART_CACHE", str(tmp_path / "pixart-cache"))
