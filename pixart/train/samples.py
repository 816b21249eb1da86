"""Periodic sample images during training: the prompts encoded once, rendered with the transformer being trained."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..images import png_info


class SampleWriter:
    """The pipeline of a model folder without its transformer; T5 encodes the prompts once and is then freed."""

    def __init__(self, model: str, prompts: list[str], device: torch.device, max_length: int, steps: int,
                 guidance: float, seed: int, size: int | None):
        from ..pipeline import PixArtAlphaPipeline

        self.pipe = PixArtAlphaPipeline.from_pretrained(model, transformer=None, torch_dtype=torch.float32,
                                                        device=device, memory="full")
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts, self.steps, self.guidance, self.seed, self.size = prompts, steps, guidance, seed, size
        self.embeds = self.pipe.encode_prompt(prompts, guidance > 1.0, negative_prompt="", device=device,
                                              max_sequence_length=max_length)
        del self.pipe.text_encoder

    @torch.no_grad()
    def write(self, transformer: nn.Module, folder: Path, step: int) -> list[Path]:
        """Render every prompt (seed, seed + 1, ...) and save step-N-K.png in `folder`."""
        embeds, mask, neg_embeds, neg_mask = self.embeds
        size = self.size or transformer.config.sample_size * self.pipe.vae_scale_factor
        self.pipe.transformer = transformer
        was_training = transformer.training
        transformer.eval()
        try:
            images = self.pipe(
                prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg_embeds,
                negative_prompt_attention_mask=neg_mask, num_inference_steps=self.steps, guidance_scale=self.guidance,
                height=size, width=size, use_resolution_binning=False,
                generator=[torch.Generator().manual_seed(self.seed + k) for k in range(len(self.prompts))],
            ).images
        finally:
            transformer.train(was_training)
            del self.pipe.transformer
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, (prompt, image) in enumerate(zip(self.prompts, images)):
            path = folder / f"step-{step:08d}-{k}.png"
            image.save(path, pnginfo=png_info({"prompt": prompt, "step": step, "seed": self.seed + k,
                                                "steps": self.steps, "guidance": self.guidance}))
            paths.append(path)
        return paths
