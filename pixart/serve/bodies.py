"""What the routes of `pixart serve` accept: the request bodies, checked as the CLI's JSONL lines are (a bool or a
string is not a number, a number is finite), and the helpers that read their fields."""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, JsonValue, StrictBool, StrictFloat, StrictInt, StrictStr

from ..schedulers import check_karras, sampler_by_name
from .worker import ApiError

def _whole(value):
    """A whole float (20.0, as a client in a language without integers sends 20) as the int it is; anything else
    is left for StrictInt to judge (a bool or a string is not a number; 20.5 is not whole)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# an integer field: 20 or 20.0, never true, "20" or 20.5
WholeInt = Annotated[StrictInt, BeforeValidator(_whole)]
# null means no negative prompt, as many clients send it
NegativePrompt = Annotated[str, BeforeValidator(lambda v: "" if v is None else v)]
# pixart.PixArtAlphaPipeline's cache=: a preset, a threshold, or [threshold, max_reuse]; never a bool
Cache = StrictFloat | StrictInt | StrictStr | tuple[StrictFloat | StrictInt, StrictInt | None] | None


class Body(BaseModel):
    """A request body as the CLI's JSONL lines are read: a bool or a string is not a number, a number is finite
    (1e400 overflows to infinity); unknown fields are kept for `refuse_unknown`."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")


class ImagesRequest(Body):
    """OpenAI `POST /v1/images/generations` (every documented field; those that change nothing here are accepted and
    ignored), plus PixArt's own knobs."""

    prompt: str
    model: str | None = None  # one model per server
    n: WholeInt = 1
    quality: str | None = None
    response_format: str = "b64_json"
    size: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: WholeInt | None = None
    output_format: str | None = None
    partial_images: WholeInt | None = None
    stream: StrictBool = False
    negative_prompt: NegativePrompt = ""
    seed: WholeInt | None = None
    num_inference_steps: WholeInt = 20
    guidance_scale: StrictFloat = 4.5
    scheduler: str | None = None
    guidance_interval: tuple[StrictFloat, StrictFloat] | None = None  # pixart.PixArtAlphaPipeline's
    cache: Cache = None


class Txt2ImgRequest(Body):
    """AUTOMATIC1111 `POST /sdapi/v1/txt2img` (the fields PixArt has, and those it refuses; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: NegativePrompt = ""
    seed: WholeInt | None = -1
    steps: WholeInt = 20
    cfg_scale: StrictFloat = 4.5
    width: WholeInt | None = None
    height: WholeInt | None = None
    batch_size: WholeInt = 1
    n_iter: WholeInt = 1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None  # AUTOMATIC1111 1.9's noise schedule: "Automatic" or "Karras" here
    enable_hr: StrictBool = False  # the hires fix: not available
    override_settings: dict[str, JsonValue] | None = None  # only sd_model_checkpoint means something here


class JobRequest(Body):
    """The web page's `POST /api/jobs`."""

    prompt: str
    negative_prompt: NegativePrompt = ""
    width: WholeInt | None = None
    height: WholeInt | None = None
    steps: WholeInt = 20
    guidance_scale: StrictFloat = 4.5
    seed: WholeInt | None = None
    n: WholeInt = 1
    scheduler: str | None = None
    guidance_interval: tuple[StrictFloat, StrictFloat] | None = None  # pixart.PixArtAlphaPipeline's
    cache: Cache = None


# AUTOMATIC1111 1.9's noise schedules (the `scheduler` field of txt2img), in any case: their Karras setting
SCHEDULES = {"automatic": None, "karras": True}


def sampler(name: str | None, default: str, param: str, schedule: str | None = None) -> tuple[str, bool | None]:
    """(the SAMPLERS key, Karras noise levels or None for the config's) of a request's sampler name (any alias, any
    case, AUTOMATIC1111's "... Karras" too; None: the model's own, `default`) and of AUTOMATIC1111's separate
    noise `schedule` field (a SCHEDULES name in any case)."""
    named = (schedule or "automatic").strip().lower()
    if named not in SCHEDULES:
        raise ApiError(400, f"scheduler {schedule!r} is not available: use Automatic (the model's own) or Karras",
                       param="scheduler")
    karras = SCHEDULES[named]
    key = default
    try:
        if name:
            key, named_karras = sampler_by_name(name)
            karras = karras or named_karras
        if karras:
            check_karras(key)
    except ValueError as e:
        message = str(e)
        if param != "scheduler":  # AUTOMATIC1111's sampler_name: its `scheduler` is the noise schedule
            message = re.sub(r"^unknown scheduler", "unknown sampler", message)
        raise ApiError(400, message, param=param) from None
    return key, karras


def refuse_unknown(body: Body) -> None:
    """A field the route does not have is an error (as OpenAI words it), naming the fields it has."""
    if body.model_extra:
        name = next(iter(body.model_extra))
        raise ApiError(400, f"Unrecognized request argument supplied: {name} (the arguments are "
                            f"{', '.join(type(body).model_fields)})", param=name, code="unknown_parameter")


def require_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise ApiError(400, "prompt is empty: describe the image to generate", param="prompt", code="invalid_value")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" (or "auto"/None for the model's size) as (width, height)."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d+)x(\d+)", size.strip())
    if not match:
        raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)", param="size")
    return int(match[1]), int(match[2])
