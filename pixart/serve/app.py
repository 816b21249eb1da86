"""`pixart serve`: OpenAI Images API, a subset of AUTOMATIC1111's API, job events for the web page, health, metrics
(what the routes accept: bodies.py; the layer under them: transport.py; the model's thread: worker.py)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from ..bins import classify_height_width_bin, model_bin_table
from ..denoise import check_guidance_interval
from ..reuse import cache_setting
from ..samplers import SAMPLERS
from ..schedulers import SAMPLER_NAMES
from .bodies import (SCHEDULES, ImagesRequest, JobRequest, Txt2ImgRequest, parse_size, refuse_unknown, require_prompt,
                     sampler)
from .transport import ERROR_HANDLERS, CountRequests, Gate, Json, check_key
from .worker import ApiError, Job, Metrics, QueueFull, Settings, Worker

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
DISCONNECT_POLL_S = 0.1  # how often a waiting request checks whether its client is still there
JOB_TTL_S = 600  # finished web-page jobs are forgotten after this long
SIZE_LABELS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))  # width:height presets, snapped to bins


@dataclass(frozen=True)
class Limits:
    """The largest request the server accepts."""

    max_n: int = 4
    max_steps: int = 100
    max_side: int = 2048
    max_prompt_chars: int = 2000
    max_body_bytes: int = 1 << 20  # a request body; prompts are short, so this is generous


def create_app(load: Callable[[], Any], *, model_name: str, api_key: str | None = None, max_queue: int = 32,
               max_batch: int = 4, limits: Limits = Limits(),
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server around the pipeline `load()` returns; it loads on the worker thread once the app starts."""
    if max_queue < 1 or max_batch < 1:
        raise ValueError(f"--max-queue and --max-batch must be at least 1, got {max_queue} and {max_batch}")
    metrics = Metrics()
    worker = Worker(load, model_name, metrics, max_queue, max_batch, on_load_error)
    jobs: dict[str, Job] = {}  # the web page's jobs, by id

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.close()

    app = FastAPI(title="pixart", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=Json)
    app.state.worker = worker
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       routes=lambda: [*api.routes, *app.router.routes])
    app.add_middleware(CountRequests, metrics=metrics)  # the outer one: it counts the gate's answers too
    for error_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error_type, handler)

    async def authorize_events(request: Request) -> None:
        """EventSource cannot send headers: the events route also takes ?api_key=."""
        query_key = request.query_params.get("api_key")
        check_key(api_key, request.headers.get("authorization") or (query_key and f"Bearer {query_key}"))

    def pipeline() -> Any:
        if worker.pipe is None:
            raise ApiError(503, "the model is still loading: retry shortly", type="server_error", code="loading",
                           headers={"Retry-After": "5"})
        return worker.pipe

    def default_sampler() -> str:
        pipeline()  # loaded
        return worker.default_scheduler.class_name

    def default_size() -> int:
        pipe = pipeline()
        return pipe.default_size

    def make_settings(*, prompt: str, negative_prompt: str, width: int | None, height: int | None, steps: int,
                      guidance_scale: float, scheduler: str | None, n: int, seed: int | None,
                      names: dict[str, str], guidance_interval: tuple[float, float] | None = None,
                      cache: Any = None, labels: dict[str, str] | None = None, schedule: str | None = None) -> Settings:
        """Check a request against the limits; `names` maps our field names to the route's (`labels`: to what its
        messages call them, where that differs)."""
        def check(ok: bool, field: str, value: Any, rule: str) -> None:
            if not ok:
                label = (labels or {}).get(field) or names.get(field, field)
                raise ApiError(400, f"{label} is {value}: {rule}", param=names.get(field, field), code="invalid_value")

        for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            check(len(text) <= limits.max_prompt_chars, field, f"{len(text)} characters long",
                  f"max_prompt_chars is {limits.max_prompt_chars}")
            surrogate = re.search("[\ud800-\udfff]", text)  # JSON's "\ud800" unpaired: no character, no UTF-8
            check(surrogate is None, field, "not Unicode text", surrogate and f"character {surrogate.start()} is a "
                  f"lone UTF-16 surrogate, {surrogate[0]!a}: a surrogate must be half of a \\uD83D\\uDE00 pair")
        check(1 <= n <= limits.max_n, "n", n, f"it must be between 1 and max_n = {limits.max_n}")
        check(1 <= steps <= limits.max_steps, "steps", steps,
              f"it must be between 1 and max_steps = {limits.max_steps}")
        width, height = (default_size() if side is None else side for side in (width, height))
        for field, side in (("width", width), ("height", height)):
            check(64 <= side <= limits.max_side and side % 8 == 0, field, side,
                  f"it must be a multiple of 8 between 64 and max_side = {limits.max_side}")
        check(0 <= guidance_scale <= 100, "guidance_scale", guidance_scale, "it must be between 0 and 100")
        seed = random.randrange(2**32) if seed is None or seed == -1 else seed
        check(0 <= seed <= 2**63 - n, "seed", seed, "use -1 or null for a random seed, else 0 to 2**63 - n")
        for field, value, parse in (("guidance_interval", guidance_interval, check_guidance_interval),
                                    ("cache", cache, cache_setting)):
            try:
                parse(value)
            except ValueError as e:
                raise ApiError(400, str(e), param=field, code="invalid_value") from None
        key, karras = sampler(scheduler, default_sampler(), names.get("scheduler", "scheduler"), schedule)
        if karras is None:  # the model's own noise levels: named, so that the batch key and the label say them
            karras = worker.default_scheduler.use_karras_sigmas
        return Settings(prompt, negative_prompt, width, height, steps, float(guidance_scale), key,
                        tuple(seed + i for i in range(n)), guidance_interval, cache, karras)

    def submit(settings: Settings, interruptible: bool = False) -> Job:
        job = Job(settings, asyncio.get_running_loop(), interruptible)
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({max_queue} jobs waiting): retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(worker.retry_after())}) from None
        return job

    async def result(job: Job, request: Request) -> dict:
        """The job's "done" event (images, seeds, settings); the job is cancelled if the client goes away first."""
        while not job.future.done():
            await asyncio.wait([job.future], timeout=DISCONNECT_POLL_S)
            if not job.future.done() and await request.is_disconnected():
                worker.cancel(job)
        return job.future.result()

    api = APIRouter()  # behind the key: Gate checks it before a body is read

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

    @api.post("/v1/images/generations")
    async def images_generations(body: ImagesRequest, request: Request) -> dict:
        refuse_unknown(body)
        if body.response_format != "b64_json":
            raise ApiError(400, f"response_format {body.response_format!r} is not supported: this server keeps no "
                                "image files to link to, use b64_json", param="response_format")
        if body.output_format not in (None, "png") or body.stream:
            raise ApiError(400, "only whole PNG images are supported: leave out output_format and stream",
                           param="output_format" if body.output_format not in (None, "png") else "stream")
        if body.background not in (None, "auto", "opaque"):
            raise ApiError(400, f"background {body.background!r} is not supported: the images are opaque (auto or "
                                "opaque)", param="background")
        require_prompt(body.prompt)
        width, height = parse_size(body.size)
        job = submit(make_settings(
            prompt=body.prompt, negative_prompt=body.negative_prompt, width=width, height=height,
            steps=body.num_inference_steps, guidance_scale=body.guidance_scale, scheduler=body.scheduler, n=body.n,
            seed=body.seed, names={"steps": "num_inference_steps", "width": "size", "height": "size"},
            labels={"width": "the width of size", "height": "the height of size"},
            guidance_interval=body.guidance_interval, cache=body.cache,
        ))
        images = (await result(job, request))["images"]
        return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": body.prompt} for b in images]}

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict:
        """An interrupt (/sdapi/v1/interrupt) answers 200 with the images of the steps run, as AUTOMATIC1111 does."""
        for field in ("batch_size", "n_iter"):
            if getattr(body, field) < 1:
                raise ApiError(400, f"{field} is {getattr(body, field)}: it must be at least 1", param=field,
                               code="invalid_value")
        if body.enable_hr:
            raise ApiError(400, "enable_hr (the hires fix) is not supported: ask for the final width and height, "
                                "or leave enable_hr out", param="enable_hr", code="unsupported")
        check_checkpoint((body.override_settings or {}).get("sd_model_checkpoint"), "override_settings")
        sampler_field = "sampler_index" if body.sampler_index and not body.sampler_name else "sampler_name"
        job = submit(make_settings(
            prompt=body.prompt, negative_prompt=body.negative_prompt, width=body.width, height=body.height,
            steps=body.steps, guidance_scale=body.cfg_scale, scheduler=getattr(body, sampler_field),
            n=body.batch_size * body.n_iter, seed=body.seed,
            names={"n": "batch_size", "guidance_scale": "cfg_scale", "scheduler": sampler_field},
            labels={"n": "batch_size × n_iter"}, schedule=body.scheduler,
        ), interruptible=True)
        done = await result(job, request)
        s, n = job.settings, len(job.settings.seeds)
        info = {"prompt": s.prompt, "all_prompts": [s.prompt] * n, "negative_prompt": s.negative_prompt,
                "all_negative_prompts": [s.negative_prompt] * n, "seed": s.seeds[0], "all_seeds": list(s.seeds),
                "width": s.width, "height": s.height, "sampler_name": s.sampler_name,
                "cfg_scale": s.guidance_scale, "steps": s.steps, "batch_size": body.batch_size,
                "n_iter": body.n_iter, "sd_model_name": model_name,
                "interrupted": done["settings"].get("interrupted", False),
                "steps_run": done["settings"].get("steps_run", s.steps)}
        return {"images": done["images"], "parameters": body.model_dump(), "info": json.dumps(info)}

    @api.get("/sdapi/v1/progress")
    async def progress() -> dict:
        running, step, total = bool(worker.running), worker.step, worker.total
        elapsed = time.monotonic() - worker.started_at
        return {
            "progress": step / total if running and total else 0.0,
            "eta_relative": elapsed / step * (total - step) if running and step else 0.0,
            "state": {"job_count": len(worker.waiting) + len(worker.running), "sampling_step": step if running else 0,
                      "sampling_steps": total if running else 0, "interrupted": worker.interrupted, "skipped": False},
            "current_image": None, "textinfo": None,
        }

    @api.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        worker.interrupt()
        return {}

    def checkpoint() -> str:
        """The model's name as AUTOMATIC1111's clients see it."""
        return Path(model_name).name or model_name

    @api.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict]:
        return [{"title": checkpoint(), "model_name": checkpoint(), "hash": None, "sha256": None,
                 "filename": model_name, "config": None}]

    @api.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict]:
        return [{"name": SAMPLER_NAMES.get(name, name), "aliases": [name], "options": {}} for name in SAMPLERS]

    @api.get("/sdapi/v1/schedulers")  # AUTOMATIC1111 1.9's noise schedules: the model's own, or Karras
    async def schedulers() -> list[dict]:
        return [{"name": name, "label": name.capitalize(), "aliases": None} for name in SCHEDULES]

    @api.get("/sdapi/v1/options")  # clients read the checkpoint here, and check the connection with it
    async def options() -> dict:
        return {"sd_model_checkpoint": checkpoint(), "samples_format": "png"}

    def check_checkpoint(wanted: Any, param: str) -> None:
        """One model per server: naming it again is fine, another one is an error."""
        if wanted not in (None, checkpoint(), model_name):
            raise ApiError(400, f"this server serves one model, {checkpoint()}: start another `pixart serve --model "
                                f"{wanted}` for {wanted!r}", param=param, code="invalid_value")

    @api.post("/sdapi/v1/options")
    async def set_options(body: dict) -> None:
        """The checkpoint must be this server's; other options are ignored."""
        check_checkpoint(body.get("sd_model_checkpoint"), "sd_model_checkpoint")

    @api.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(len(worker.waiting), len(worker.running)),
                                 media_type="text/plain; version=0.0.4")

    @api.post("/api/jobs")
    async def create_job(body: JobRequest) -> dict:
        now = time.monotonic()
        for job_id in [i for i, j in jobs.items() if j.finished_at is not None and now - j.finished_at > JOB_TTL_S]:
            del jobs[job_id]
        refuse_unknown(body)
        require_prompt(body.prompt)
        job = submit(make_settings(
            prompt=body.prompt, negative_prompt=body.negative_prompt, width=body.width, height=body.height,
            steps=body.steps, guidance_scale=body.guidance_scale, scheduler=body.scheduler, n=body.n, seed=body.seed,
            names={}, guidance_interval=body.guidance_interval, cache=body.cache,
        ))
        jobs[job.id] = job
        return {"job_id": job.id, "seeds": list(job.settings.seeds)}

    @api.delete("/api/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict:
        job = find(jobs, job_id)
        running = not job.future.done()
        worker.cancel(job)
        return {"job_id": job_id, "cancelled": running}

    @app.get("/api/jobs/{job_id}/events", dependencies=[Depends(authorize_events)])
    async def job_events(job_id: str) -> StreamingResponse:
        job = find(jobs, job_id)
        queue = job.subscribe()

        async def stream():
            try:
                while True:
                    event, data = await queue.get()
                    yield f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"
                    if event != "progress":
                        return
            finally:  # the last listener going away before the end cancels the job
                job.listeners.discard(queue)
                if not job.listeners:
                    worker.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/config")  # open like / and /health: the page needs it to ask for the key; holds no data
    async def config() -> dict:
        pipe, size = pipeline(), default_size()
        cfg = pipe.model_config("transformer")
        table = model_bin_table(cfg.sample_size, pipe.vae_scale_factor, cfg.patch_size)
        return {
            "model": model_name, "sizes": size_presets(table),
            "defaults": {"steps": 20, "guidance_scale": 4.5, "width": size, "height": size},
            "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps, "max_side": limits.max_side,
                       "max_prompt_chars": limits.max_prompt_chars},
            "samplers": [SAMPLER_NAMES.get(name, name) for name in SAMPLERS], "auth": api_key is not None,
        }

    @app.get("/health")
    async def health() -> dict:
        if worker.pipe is None:
            message = f"loading the model failed: {worker.load_error}" if worker.load_error else "the model is loading"
            raise ApiError(503, message, type="server_error", code="loading")
        return {"status": "ok"}

    @app.get("/", response_model=None)
    async def page() -> FileResponse | PlainTextResponse:
        if PAGE.is_file():
            return FileResponse(PAGE, media_type="text/html")
        return PlainTextResponse("pixart serve: the web page is not installed; the API is at /v1/images/generations")

    for path, route in (("/health", health), ("/", page)):  # HEAD as GET, for uptime monitors
        app.add_api_route(path, route, methods=["HEAD"], include_in_schema=False, response_model=None)
    app.include_router(api)
    return app


def size_presets(table: dict[str, list[float]]) -> list[dict]:
    """The common aspect ratios snapped to the model's bins."""
    out, seen = [], set()
    for w, h in SIZE_LABELS:
        height, width = classify_height_width_bin(h, w, table)
        if (width, height) not in seen:
            seen.add((width, height))
            out.append({"label": f"{w}:{h}", "width": width, "height": height})
    return out


def find(jobs: dict[str, Job], job_id: str) -> Job:
    if job_id not in jobs:
        raise ApiError(404, f"no job {job_id!r} (finished jobs are kept {JOB_TTL_S} s)", param="job_id",
                       code="not_found")
    return jobs[job_id]


class Server(uvicorn.Server):
    """uvicorn's server, failing the app's waiting and running jobs (503) as soon as it begins to shut down: uvicorn
    ends the app's lifespan only once the open requests have ended, and those wait for the worker."""

    async def shutdown(self, sockets: list | None = None) -> None:
        self.config.app.state.worker.close()
        await super().shutdown(sockets)


def serve(args: argparse.Namespace) -> None:
    """`pixart serve`: listen at once, load the pipeline in the background, serve until interrupted."""
    from ..cli import load_pipeline

    server: Server | None = None

    def stop(error: BaseException) -> None:
        server.should_exit = True

    app = create_app(lambda: load_pipeline(args), model_name=str(args.model), api_key=args.api_key,
                     max_queue=args.max_queue, max_batch=args.max_batch, on_load_error=stop)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5))
    server.run()
    worker = app.state.worker
    if worker.load_error is not None:
        raise worker.load_error
    # torch must not be inside a step while the interpreter ends (std::terminate: an abort, exit 134): the closed
    # worker stops at the end of its step; loading cannot be stopped, and has nothing to keep, so we leave it
    worker.close()
    if worker.loading:
        print("pixart: interrupted while loading the model", file=sys.stderr, flush=True)
        os._exit(130)
    try:
        if not worker.join(1.0):
            print("pixart: stopping at the end of the running step (Ctrl-C again to quit now)", file=sys.stderr,
                  flush=True)
            worker.join()
    except KeyboardInterrupt:
        print("pixart: interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    # run() returns only once a signal stopped it: exit as interrupted (130) ourselves rather than rely on uvicorn
    # re-raising the signal (under a loaded machine it once returned normally, exit 0)
    raise KeyboardInterrupt
