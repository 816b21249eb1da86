"""Decoded-image post-processing: resize + centre-crop back to the requested size, and output types."""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .bins import classify_height_width_bin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def resize_and_crop_tensor(samples: torch.Tensor, new_width: int, new_height: int,
                           antialias: bool = False) -> torch.Tensor:
    """Bilinear resize (B, C, H, W) so it covers new_height × new_width, then crop the centre.

    antialias: average over the source pixels when shrinking (as PIL does), not only sample 2x2 of them."""
    height, width = samples.shape[2], samples.shape[3]
    if (height, width) == (new_height, new_width):
        return samples
    ratio = max(new_height / height, new_width / width)
    # max(): float rounding must never leave the cover a pixel short of the request
    rh, rw = max(int(height * ratio), new_height), max(int(width * ratio), new_width)
    samples = F.interpolate(samples, size=(rh, rw), mode="bilinear", align_corners=False,
                            antialias=antialias)
    top, left = (rh - new_height) // 2, (rw - new_width) // 2
    return samples[:, :, top : top + new_height, left : left + new_width]


def png_info(settings: dict) -> PngInfo:
    """The PNG text chunk "parameters" holding an image's generation settings as JSON (CLI and server alike)."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    return info


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> PIL images."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(-1), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


class ImageProcessor:
    """The slice of diffusers' PixArtImageProcessor that user code calls."""

    def __init__(self, vae_scale_factor: int = 8):
        self.vae_scale_factor = vae_scale_factor

    classify_height_width_bin = staticmethod(classify_height_width_bin)
    resize_and_crop_tensor = staticmethod(resize_and_crop_tensor)
    numpy_to_pil = staticmethod(numpy_to_pil)

    @staticmethod
    def postprocess(image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """VAE output (B, C, H, W) in [-1, 1] -> PIL list, NHWC numpy or NCHW tensor in [0, 1]."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"postprocess takes a torch.Tensor (B, C, H, W), got {type(image).__name__}")
        if output_type == "latent":
            return image
        if do_denormalize is None:
            image = (image / 2 + 0.5).clamp(0, 1)
        else:
            image = torch.stack([(im / 2 + 0.5).clamp(0, 1) if d else im for im, d in zip(image, do_denormalize)])
        if output_type == "pt":
            return image
        array = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else numpy_to_pil(array)
