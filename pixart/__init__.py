"""PixArt-α text-to-image in plain PyTorch, with diffusers' public API."""
from .bins import ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from .configs import PRESETS, SchedulerConfig, T5Config, TransformerConfig, VAEConfig
from .models.t5 import T5EncoderModel
from .models.transformer import PixArtTransformer2DModel
from .models.vae import AutoencoderKL
from .pipeline import ImagePipelineOutput, PixArtAlphaPipeline
from .schedulers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                         EulerDiscreteScheduler, LCMScheduler)
from .tokenizer import T5Tokenizer
from .weights.files import WeightsError

__all__ = [
    "ASPECT_RATIO_1024_BIN", "ASPECT_RATIO_256_BIN", "ASPECT_RATIO_512_BIN", "AutoencoderKL", "DDIMScheduler",
    "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "ImagePipelineOutput",
    "LCMScheduler", "PRESETS", "PixArtAlphaPipeline", "PixArtTransformer2DModel", "SchedulerConfig", "T5Config", "T5EncoderModel", "T5Tokenizer",
    "TransformerConfig", "VAEConfig", "WeightsError",
]
