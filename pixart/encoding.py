"""Step 1 of the pipeline: prompts to T5 embeddings and masks (diffusers' `encode_prompt`), with the prompt cache."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from .components import Held, is_available, module_device, module_dtype
from .inputs import embeddings_with_mask, per_image, whole_number
from .tokenizer import preprocess_prompt, warn_truncated

# the longest prompt padding accepted: 34× PixArt-α's 120 (PixArt-Σ's 300 with room to spare); T5-XXL's attention
# scores at this length are 4 GB per layer in fp32
MAX_SEQUENCE_LENGTH = 4096


class PromptEncoding:
    """The pipeline's prompt encoding: `encode_prompt` as diffusers', the text encoder loaded once per call (staged
    mode) and only for prompts the prompt cache lacks. A subclass keeps the components (ModelPlacement's state),
    `prompt_cache` and `_encoder_id`."""

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = "",
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        clean_caption: bool = False,
        max_sequence_length: int = 120,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """T5 embeddings and masks of the prompts and (with guidance) the negative prompts, one row per image."""
        kwargs.pop("mask_feature", None)  # deprecated in diffusers, without effect
        if kwargs:
            raise TypeError(f"encode_prompt() got unexpected keyword arguments: {', '.join(kwargs)}")
        device = torch.device(device) if device is not None else self.device
        with contextlib.ExitStack() as stack:  # holds the text encoder (loaded once) while any text is encoded
            return self._encode_prompt(
                prompt, do_classifier_free_guidance, negative_prompt, num_images_per_prompt, device, prompt_embeds,
                negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, clean_caption,
                max_sequence_length, Held(self, "text_encoder", stack),
            )

    def _encode_prompt(self, prompt, do_classifier_free_guidance, negative_prompt, num_images_per_prompt, device,
                       prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
                       clean_caption, max_sequence_length, text_encoder: Held):
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode(prompts, clean_caption, max_sequence_length, device,
                                                                text_encoder)
        elif prompt_attention_mask is None:
            raise ValueError("prompt_embeds needs its prompt_attention_mask (the second output of encode_prompt)")
        transformer = self.model_config("transformer")
        channels = getattr(transformer, "caption_channels", None)
        prompt_embeds, prompt_attention_mask = embeddings_with_mask(prompt_embeds, prompt_attention_mask, "prompt",
                                                                    channels)
        like = tuple(prompt_embeds.shape[:2])
        dtype = self._embedding_dtype(prompt_embeds)
        n_prompts = prompt_embeds.shape[0]
        prompt_embeds = per_image(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        prompt_attention_mask = per_image(prompt_attention_mask.to(device), num_images_per_prompt)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None
        if negative_prompt_embeds is None:
            negatives = [negative_prompt or ""] * n_prompts if not isinstance(negative_prompt, list) else negative_prompt
            if len(negatives) != n_prompts:
                raise ValueError(f"{len(negatives)} negative prompts for {n_prompts} prompts: give one per prompt")
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode(
                negatives, clean_caption, prompt_embeds.shape[1], device, text_encoder, truncation_warning=False
            )
        elif negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds needs its negative_prompt_attention_mask")
        else:
            negative_prompt_embeds, negative_prompt_attention_mask = embeddings_with_mask(
                negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt", channels, like)
        negative_prompt_embeds = per_image(negative_prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        negative_prompt_attention_mask = per_image(negative_prompt_attention_mask.to(device), num_images_per_prompt)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _encode(self, texts: list[str], clean_caption: bool, max_length: int, device: torch.device,
                held: Held, truncation_warning: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) T5 states and (B, L) mask of already-split texts."""
        for name in ("tokenizer", "text_encoder"):
            if not is_available(self, name):
                raise ValueError(
                    f"this pipeline has no {name} (it was loaded with {name}=None), so it cannot encode text: "
                    "pass prompt_embeds / negative_prompt_embeds with their masks, or load the pipeline with a text encoder"
                )
        max_length = whole_number(max_length)
        if max_length is None or not 1 <= max_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be a whole number of tokens from 1 to {MAX_SEQUENCE_LENGTH} "
                             f"(PixArt-α was trained with 120), got {max_length!r}: every prompt is padded to it, "
                             "and T5's attention grows with its square")
        texts = [preprocess_prompt(t, clean_caption) for t in texts]
        if truncation_warning:
            warn_truncated(self.tokenizer, texts, max_length)
        cache = self.prompt_cache if self._encoder_id is not None else None
        # the embeddings are the text encoder's, in its dtype (a per-component dtype can differ from the pipeline's)
        encoder = f"{self._encoder_id}/{self.model_dtype('text_encoder')}"
        keys = [cache.key(encoder, t, max_length, clean_caption) for t in texts] if cache else []
        found = [cache.get(k) for k in keys] if cache else [None] * len(texts)
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:  # only now is the text encoder needed (and, when staged, loaded)
            tokens = self.tokenizer([texts[i] for i in missing], padding="max_length", max_length=max_length,
                                    truncation=True, add_special_tokens=True, return_tensors="pt")
            text_encoder = held.get()
            te_device = module_device(text_encoder)
            mask = tokens.attention_mask.to(te_device)
            embeds = text_encoder(tokens.input_ids.to(te_device), attention_mask=mask)[0]  # (B, L, D)
            for j, i in enumerate(missing):
                found[i] = embeds[j], mask[j]
                if cache:
                    cache.put(keys[i], embeds[j], mask[j])
        embeds = torch.stack([e.to(device) for e, _ in found])
        return embeds, torch.stack([m.to(device) for _, m in found])

    def _embedding_dtype(self, prompt_embeds: torch.Tensor) -> torch.dtype:
        """The dtype the transformer computes in (else the text encoder's, else the embeddings' own)."""
        if is_available(self, "transformer"):
            return self.model_dtype("transformer")
        if self._loaded.get("text_encoder") is not None:
            return module_dtype(self._loaded["text_encoder"])
        return prompt_embeds.dtype
