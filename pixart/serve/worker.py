"""The inference worker: one thread, a bounded queue, compatible jobs batched, cooperative cancellation; metrics."""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..images import png_info
from ..schedulers import sampler_label, with_sampler

logger = logging.getLogger("pixart.serve")


class ApiError(Exception):
    """An error answered in the OpenAI envelope {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Settings:
    """What one job generates: n = len(seeds) images of one prompt."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str  # a key of pixart.samplers.SAMPLERS
    seeds: tuple[int, ...]
    guidance_interval: tuple[float, float] | None = None  # the pipeline's opt-in speed settings
    cache: float | str | None = None
    karras: bool | None = None  # Karras noise levels (DPM++ 2M and Euler); None: as the model's scheduler config says

    def batch_key(self) -> tuple:
        """Jobs with equal keys run as one pipeline call; prompts and negative prompts may differ per image."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.scheduler, self.karras,
                self.guidance_interval, self.cache)

    @property
    def sampler_name(self) -> str:
        """The sampler as AUTOMATIC1111 names it: "DPM++ 2M", "DPM++ 2M Karras", ..."""
        return sampler_label(self.scheduler, self.karras)


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


class Job:
    """A request's place in the queue: its settings, its result future and its event history, owned by one loop.

    An `interruptible` job (AUTOMATIC1111's) is what /sdapi/v1/interrupt stops: it then finishes with the images of
    the steps run so far. Such jobs batch only with each other, so an interrupt never reaches another API's job."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop, interruptible: bool = False):
        self.id = uuid.uuid4().hex
        self.settings = settings
        self.loop = loop
        self.interruptible = interruptible
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False  # set from the loop, read by the worker at each step
        self.finished_at: float | None = None
        self.history: list[tuple[str, dict]] = []
        self.listeners: set[asyncio.Queue] = set()

    # called from any thread: hop onto the job's loop
    def progress(self, step: int, total: int) -> None:
        self._call(self._post, "progress", {"step": step, "total": total}, None)

    def finish(self, images: list[str], settings: dict[str, Any]) -> None:
        """Deliver the images; the future's result is the "done" event's data: images, seeds, settings."""
        done = {"images": images, "seeds": list(self.settings.seeds), "settings": settings}
        self._call(self._post, "done", done, done)

    def batch_key(self) -> tuple:
        return self.interruptible, *self.settings.batch_key()

    def fail(self, error: ApiError) -> None:
        self._call(self._post, "error", {"message": error.message}, error)

    def _call(self, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(*args)
        except RuntimeError:  # the loop has closed (server shut down): nobody is waiting any more
            pass

    def subscribe(self) -> asyncio.Queue:
        """A queue of (event, data) from the first event on; call on the job's loop."""
        queue: asyncio.Queue = asyncio.Queue()
        for item in self.history:
            queue.put_nowait(item)
        self.listeners.add(queue)
        return queue

    def _post(self, event: str, data: dict, outcome: Any) -> None:
        if self.future.done():
            return  # cancelled or failed earlier: what the worker delivers later is dropped
        self.history.append((event, data))
        for queue in self.listeners:
            queue.put_nowait((event, data))
        if event == "progress":
            return
        self.finished_at = time.monotonic()
        if isinstance(outcome, ApiError):
            self.future.set_exception(outcome)
            self.future.exception()  # retrieved here: a job nobody awaits must not log "never retrieved"
        else:
            self.future.set_result(outcome)


class _Stopped(Exception):
    """Raised from the step callback to abort the pipeline call, with the x_0 estimate of the last step run."""

    def __init__(self, latents: torch.Tensor, steps: int):
        super().__init__()
        self.latents, self.steps = latents, steps


class QueueFull(Exception):
    """max_queue jobs are already waiting."""


class Metrics:
    """Counters for /metrics, updated from the loop and the worker thread."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status) -> count
        self.images = 0
        self.batches = 0
        self.cancelled = 0
        self.seconds_sum = 0.0
        self.buckets = [0] * len(self.BUCKETS)

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] += 1

    def count_cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def observe_images(self, n: int, seconds: float) -> None:
        """n images made in `seconds`: n observations of seconds / n."""
        per_image = seconds / n
        with self._lock:
            self.images += n
            self.batches += 1
            self.seconds_sum += seconds
            for i, bound in enumerate(self.BUCKETS):
                if per_image <= bound:
                    self.buckets[i] += n

    def mean_seconds_per_image(self) -> float | None:
        return self.seconds_sum / self.images if self.images else None

    def render(self, queue_size: int, running: int) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            lines = [
                "# HELP pixart_queue_size Jobs waiting for the worker.", "# TYPE pixart_queue_size gauge",
                f"pixart_queue_size {queue_size}",
                "# HELP pixart_running_jobs Jobs in the pipeline call now.", "# TYPE pixart_running_jobs gauge",
                f"pixart_running_jobs {running}",
                "# HELP pixart_requests_total HTTP requests by route and status.",
                "# TYPE pixart_requests_total counter",
                *(f'pixart_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(self.requests.items())),
                "# HELP pixart_images_generated_total Images generated.",
                "# TYPE pixart_images_generated_total counter", f"pixart_images_generated_total {self.images}",
                "# HELP pixart_batches_total Pipeline calls (a batch runs compatible jobs together).",
                "# TYPE pixart_batches_total counter", f"pixart_batches_total {self.batches}",
                "# HELP pixart_jobs_cancelled_total Jobs cancelled by their client before they finished.",
                "# TYPE pixart_jobs_cancelled_total counter", f"pixart_jobs_cancelled_total {self.cancelled}",
                "# HELP pixart_seconds_per_image Pipeline time per image (a batch's time over its images).",
                "# TYPE pixart_seconds_per_image histogram",
                *(f'pixart_seconds_per_image_bucket{{le="{"+Inf" if b == math.inf else b}"}} {n}'
                  for b, n in zip(self.BUCKETS, self.buckets)),
                f"pixart_seconds_per_image_sum {self.seconds_sum}", f"pixart_seconds_per_image_count {self.images}",
            ]
        return "\n".join(lines) + "\n"


def png_base64(image, settings: dict[str, Any]) -> str:
    """A PIL image as base64 PNG with its settings as JSON in the "parameters" text chunk."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(settings))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Worker:
    """Loads the pipeline, then runs queued jobs one batch at a time on its own thread."""

    def __init__(self, load: Callable[[], Any], model_name: str, metrics: Metrics, max_queue: int, max_batch: int,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.load, self.model_name, self.metrics = load, model_name, metrics
        self.max_queue, self.max_batch = max_queue, max_batch
        self.on_load_error = on_load_error
        self.pipe: Any = None  # set once loaded
        self.default_scheduler = None
        self.load_error: BaseException | None = None
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.step, self.total, self.started_at, self.interrupted = 0, 0, 0.0, False
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name="pixart-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop taking jobs; waiting and running jobs fail now (503), the running batch stops at its next step."""
        with self._cond:
            self._closed = True
            for job in [*self.waiting, *self.running]:
                job.fail(shutting_down())
            self.waiting.clear()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker thread to end (after close(): at the end of the running step); whether it has."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def loading(self) -> bool:
        return self.pipe is None and self.load_error is None

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_queue jobs are already waiting (ApiError 503 once closed)."""
        with self._cond:
            if self._closed:
                raise shutting_down()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or let the running batch stop at its next step once all its jobs are cancelled."""
        with self._cond:
            if job.future.done():
                return
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
        self.metrics.count_cancel()
        job.fail(ApiError(499, "the job was cancelled", code="cancelled"))

    def interrupt(self) -> None:
        """Stop the running batch at its next step if it is AUTOMATIC1111's (/sdapi/v1/interrupt); its jobs finish
        with the images so far. Waiting jobs are not affected, nor a batch of the other APIs."""
        self.interrupted = any(job.interruptible for job in self.running)

    def retry_after(self) -> int:
        """Seconds until the queue has probably room again."""
        mean = self.metrics.mean_seconds_per_image() or 1.0
        return min(300, max(1, math.ceil(mean * sum(len(job.settings.seeds) for job in self.running))))

    def _main(self) -> None:
        try:
            pipe = self.load()
            pipe.set_progress_bar_config(disable=True)
            self.default_scheduler = pipe.scheduler
            self.pipe = pipe
        except Exception as e:  # noqa: BLE001 -- reported to the server, which exits
            self.load_error = e
            if self.on_load_error is None:
                logger.exception("loading the pipeline failed")
            else:  # the server stops and reports it (`pixart serve`: one line, no traceback)
                self.on_load_error(e)
            return
        logger.info("pipeline loaded: serving")
        while True:
            with self._cond:
                while not self.waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take_batch()
            self._run(batch)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the compatible waiting jobs after it, up to max_batch images."""
        batch = [self.waiting.popleft()]
        key, images = batch[0].batch_key(), len(batch[0].settings.seeds)
        for job in list(self.waiting):
            n = len(job.settings.seeds)
            if job.batch_key() == key and images + n <= self.max_batch:
                self.waiting.remove(job)
                batch.append(job)
                images += n
        return batch

    def _run(self, batch: list[Job]) -> None:
        """Run a batch; if it fails, run each of its jobs alone, so that only the job at fault gets the error."""
        error = self._attempt(batch)
        if error is None:
            return
        if len(batch) == 1 or self._closed:
            for job in batch:
                job.fail(error)
            return
        logger.warning("a batch of %d jobs failed (%s): running each alone", len(batch), error.message)
        for job in batch:
            if not job.cancelled:
                self._run([job])

    def _attempt(self, batch: list[Job]) -> ApiError | None:
        """One pipeline call for the batch, its outcome delivered to its jobs; a failure is returned, undelivered."""
        with self._cond:
            self.running, self.step, self.total = batch, 0, batch[0].settings.steps
            self.started_at, self.interrupted = time.monotonic(), False
        started = time.perf_counter()
        try:
            images, stopped = self._generate(batch)
        except _Stopped:
            error = shutting_down() if self._closed else ApiError(499, "the job was cancelled", code="cancelled")
            for job in batch:
                job.fail(error)
            return None
        except ValueError as e:  # the pipeline's word on a request's values
            return ApiError(400, str(e))
        except Exception as e:  # noqa: BLE001 -- one failing batch must not take the worker down
            logger.exception("generation failed")
            return ApiError(500, f"generation failed: {e}", type="server_error")
        finally:
            self.running = []
        self.metrics.observe_images(len(images), time.perf_counter() - started)
        start = 0
        for job in batch:
            n, settings = len(job.settings.seeds), {**self.describe(job.settings), **stopped}
            job.finish([png_base64(image, {**settings, "seed": seed})
                        for image, seed in zip(images[start : start + n], job.settings.seeds)], settings)
            start += n
        return None

    def _generate(self, batch: list[Job]) -> tuple[list, dict[str, Any]]:
        """The batch's images from one pipeline call (a prompt and a generator per image, so batching changes no
        pixel), and what an interrupt adds to their settings: an interrupted call's images are the last step's
        estimate of the clean image (AUTOMATIC1111's preview), not its still noisy latents."""
        first = batch[0].settings
        per_image = [(job, seed) for job in batch for seed in job.settings.seeds]

        def on_step(pipe, i: int, t, kwargs: dict) -> dict:
            if self._closed or self.interrupted or all(job.cancelled for job in batch):
                raise _Stopped(kwargs["denoised"], i + 1)
            self.step = i + 1
            for job in batch:
                job.progress(i + 1, first.steps)
            return {}

        self.pipe.scheduler = with_sampler(self.default_scheduler, first.scheduler, first.karras)
        try:
            return self.pipe(
                [job.settings.prompt for job, _ in per_image],
                negative_prompt=[job.settings.negative_prompt for job, _ in per_image],
                num_inference_steps=first.steps, guidance_scale=first.guidance_scale, height=first.height,
                width=first.width, generator=[torch.Generator().manual_seed(seed) for _, seed in per_image],
                callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["denoised"],
                guidance_interval=first.guidance_interval, cache=first.cache,
            ).images, {}
        except _Stopped as stop:
            if self._closed or not self.interrupted:
                raise
            images = self.pipe.latents_to_images(stop.latents, first.height, first.width)
            return images, {"interrupted": True, "steps_run": stop.steps}

    def describe(self, settings: Settings) -> dict[str, Any]:
        """A job's settings as the API shows them (and the PNG chunk stores them, with the image's seed)."""
        out = {k: v for k, v in asdict(settings).items() if k not in ("seeds", "karras") and v is not None}
        return {**out, "scheduler": settings.sampler_name, "model": self.model_name}
