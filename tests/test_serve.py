"""The HTTP server, started for real on a loopback port around the tiny 512 pipeline, driven over HTTP."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from pixart import PixArtAlphaPipeline
from pixart.cli import build_parser
from pixart.images import resize_and_crop_tensor
from pixart.serve.app import Limits, Server, create_app, serve
from pixart.serve.transport import Json
from pixart.serve.worker import _Stopped

KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEPS = 2


class GatedPipeline(PixArtAlphaPipeline):
    """The real pipeline recording its calls; `gate` holds a call before it starts, `step_gate` each step's end; a call
    with the prompt `poison` among its prompts fails as an input the pipeline cannot take does."""

    poison = "poison"

    def __init__(self, pipe: PixArtAlphaPipeline):
        super().__init__(**pipe.components)
        self.gate, self.step_gate = threading.Event(), threading.Event()
        self.gate.set()
        self.step_gate.set()
        self.entered, self.stepped = threading.Event(), threading.Event()
        self.calls: list[dict] = []

    def hold(self) -> None:
        """Hold the next call at the gate; `entered` tells when the worker is there."""
        self.entered.clear()
        self.gate.clear()

    def __call__(self, prompt, **kwargs):
        record = {"prompts": list(prompt), "steps": 0, "stopped": False}
        self.calls.append(record)
        self.entered.set()
        assert self.gate.wait(30)
        if self.poison in prompt:
            raise ValueError(f"cannot take the prompt {self.poison!r}")
        server_callback = kwargs["callback_on_step_end"]

        def callback(pipe, i, t, tensors):
            record["steps"] = i + 1
            self.stepped.set()
            assert self.step_gate.wait(30)
            return server_callback(pipe, i, t, tensors)

        try:
            return super().__call__(prompt, **{**kwargs, "callback_on_step_end": callback})
        except _Stopped:  # the worker's own abort, and only it: any other error must not pass for a stop
            record["stopped"] = True
            raise


@pytest.fixture(scope="module")
def pipe(pipeline_dir_512) -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def running(app):
    """Serve `app` as `pixart serve` does, on a free loopback port in a thread; yields (the base URL, the server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def server(pipe):
    """A started server with the API key and a max_queue of 2 around a GatedPipeline; yields (client, gated)."""
    gated = GatedPipeline(pipe)
    app = create_app(lambda: gated, model_name="tiny-512", api_key=KEY, max_queue=2, max_batch=4,
                     limits=Limits(max_n=4, max_steps=50, max_side=1024, max_prompt_chars=200))
    with running(app) as (url, _), httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        yield client, gated


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metric(client: httpx.Client, name: str) -> float:
    """One sample of /metrics (name may carry its labels)."""
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def strict_json(text: str):
    """JSON as JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def reference(pipe, prompt: str, seeds: list[int], width: int = 256, height: int = 256, negative: str = "",
              guidance: float = 4.5) -> list[np.ndarray]:
    """The pipeline's own images for these seeds (one CPU generator per image)."""
    images = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
                  width=width, height=height, num_images_per_prompt=len(seeds),
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return [np.asarray(im) for im in images]


def openai_body(prompt: str, **kw) -> dict:
    return {"prompt": prompt, "size": "256x256", "seed": 5, "num_inference_steps": STEPS, **kw}


def test_openai_route_answers_the_images_api_with_the_pipelines_images(server, pipe):
    client, _ = server
    r = client.post("/v1/images/generations", json=openai_body("a red circle", n=2, seed=7, model="anything"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    assert [d["revised_prompt"] for d in body["data"]] == ["a red circle"] * 2
    images = [decode(d["b64_json"]) for d in body["data"]]
    assert all(im.format == "PNG" and im.size == (256, 256) for im in images)
    for got, want in zip(images, reference(pipe, "a red circle", [7, 8])):
        np.testing.assert_array_equal(np.asarray(got), want)
    chunk = json.loads(images[1].text["parameters"])
    assert chunk == {"prompt": "a red circle", "negative_prompt": "", "width": 256, "height": 256, "steps": STEPS,
                     "guidance_scale": 4.5, "scheduler": "DPM++ 2M", "seed": 8, "model": "tiny-512"}


def test_openai_route_passes_the_speed_options_and_records_them(server, pipe):
    client, _ = server
    options = {"guidance_interval": [0.28, 5.42], "cache": "fast"}
    r = client.post("/v1/images/generations", json=openai_body("a red circle", **options))
    assert r.status_code == 200, r.text
    image = decode(r.json()["data"][0]["b64_json"])
    want = pipe("a red circle", num_inference_steps=STEPS, width=256, height=256,
                generator=[torch.Generator().manual_seed(5)], guidance_interval=(0.28, 5.42), cache="fast").images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want))
    assert {k: json.loads(image.text["parameters"])[k] for k in options} == options


def test_a1111_txt2img_returns_the_pipelines_images_with_the_seeds_in_info(server, pipe):
    client, _ = server
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a blue square", "negative_prompt": "blurry", "seed": -1,
                                               "steps": STEPS, "cfg_scale": 3.0, "width": 256, "height": 320,
                                               "batch_size": 2, "sampler_name": "Euler", "restore_faces": False})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    seed = info["seed"]
    assert info["all_seeds"] == [seed, seed + 1] and info["sampler_name"] == "Euler"
    assert body["parameters"]["prompt"] == "a blue square" and len(body["images"]) == 2
    pipe.scheduler = pipe.scheduler.replace(class_name="EulerDiscreteScheduler")
    try:
        want = reference(pipe, "a blue square", [seed, seed + 1], width=256, height=320, negative="blurry",
                         guidance=3.0)
    finally:
        pipe.scheduler = pipe.scheduler.replace(class_name="DPMSolverMultistepScheduler")
    for got, w in zip(body["images"], want):
        np.testing.assert_array_equal(np.asarray(decode(got)), w)


@pytest.mark.parametrize("fields, cls, shown", [
    ({"sampler_name": "DPM++ 2M Karras"}, "DPMSolverMultistepScheduler", "DPM++ 2M Karras"),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "EulerDiscreteScheduler", "Euler Karras"),  # A1111 1.9's
])
def test_a1111_karras_samplers_use_karras_noise_levels(server, pipe, fields, cls, shown):
    client, _ = server
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a blue square", "seed": 3, "steps": 3, "width": 256,
                                               "height": 256, **fields})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["sampler_name"] == shown
    default = pipe.scheduler
    pipe.scheduler = default.replace(class_name=cls, use_karras_sigmas=True)
    try:
        want = pipe("a blue square", num_inference_steps=3, width=256, height=256,
                    generator=[torch.Generator().manual_seed(3)]).images[0]
        pipe.scheduler = default.replace(class_name=cls)
        plain = pipe("a blue square", num_inference_steps=3, width=256, height=256,
                     generator=[torch.Generator().manual_seed(3)]).images[0]
    finally:
        pipe.scheduler = default
    got = np.asarray(decode(r.json()["images"][0]))
    np.testing.assert_array_equal(got, np.asarray(want))
    assert not np.array_equal(got, np.asarray(plain))  # the Karras levels changed the image


def test_a1111_takes_every_schedule_it_lists_in_any_case(server):
    client, _ = server
    schedules = client.get("/sdapi/v1/schedulers").json()
    shown = {}
    for schedule in schedules:
        for spelling in {schedule["name"], schedule["label"], schedule["name"].upper()}:
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 256, "height": 256,
                                                       "sampler_name": "Euler", "scheduler": spelling})
            assert r.status_code == 200, (spelling, r.text)
            shown[spelling] = json.loads(r.json()["info"])["sampler_name"]
    assert shown == {"automatic": "Euler", "Automatic": "Euler", "AUTOMATIC": "Euler",  # webuiapi sends "automatic"
                     "karras": "Euler Karras", "Karras": "Euler Karras", "KARRAS": "Euler Karras"}


def test_every_route_but_health_and_the_page_needs_the_key(server):
    client, _ = server
    bare = httpx.Client(base_url=str(client.base_url), timeout=30)
    routes = [("POST", "/v1/images/generations", openai_body("x")), ("POST", "/sdapi/v1/txt2img", {}),
              ("GET", "/sdapi/v1/progress", None), ("POST", "/sdapi/v1/interrupt", None),
              ("GET", "/sdapi/v1/sd-models", None), ("GET", "/sdapi/v1/samplers", None), ("GET", "/metrics", None),
              ("POST", "/api/jobs", {"prompt": "x"}), ("DELETE", "/api/jobs/abc", None),
              ("GET", "/api/jobs/abc/events", None)]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = bare.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["WWW-Authenticate"] == "Bearer"
    assert bare.get("/health").status_code == 200
    assert bare.get("/").status_code == 200
    assert bare.get("/api/config").json()["auth"] is True  # open: the page reads it before it has the key
    assert client.get("/sdapi/v1/samplers").status_code == 200
    job = client.post("/api/jobs", json={"prompt": "x", "steps": 1, "width": 256, "height": 256}).json()
    events = bare.get(f"/api/jobs/{job['job_id']}/events", params={"api_key": KEY})  # EventSource sends no headers
    assert events.status_code == 200 and "event: done" in events.text
    assert bare.get(f"/api/jobs/{job['job_id']}/events", params={"api_key": "wrong"}).status_code == 401


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/images/generations", {"size": "256x256"}, "prompt", "Field required"),
    ("/v1/images/generations", openai_body("x", n=5), "n", "max_n = 4"),
    ("/v1/images/generations", openai_body("x", n="two"), "n", "integer"),
    ("/v1/images/generations", openai_body("x", num_inference_steps=51), "num_inference_steps", "max_steps = 50"),
    ("/v1/images/generations", openai_body("x", size="2048x2048"), "size", "max_side = 1024"),
    ("/v1/images/generations", openai_body("x", size="250x256"), "size", "multiple of 8"),
    ("/v1/images/generations", openai_body("x", size="big"), "size", "WIDTHxHEIGHT"),
    ("/v1/images/generations", openai_body("y" * 201), "prompt", "201 characters long: max_prompt_chars is 200"),
    ("/v1/images/generations", openai_body("x", response_format="url"), "response_format", "b64_json"),
    ("/v1/images/generations", openai_body("x", scheduler="Heun"), "scheduler", "DPM++ 2M"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size", "max_n = 4"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -1}, "cfg_scale", "between 0 and 100"),
    # AUTOMATIC1111's sampler is sampler_name (its `scheduler` is the noise schedule); the other routes' is scheduler
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Heun"}, "sampler_name", "unknown sampler 'Heun'"),
    ("/v1/images/generations", openai_body("x", scheduler="Heun"), "scheduler", "unknown scheduler 'Heun'"),
    ("/api/jobs", {"prompt": "x", "width": 4096}, "width", "max_side"),
    ("/v1/images/generations", openai_body("x", guidance_interval=[5, 1]), "guidance_interval", "sigma_lo < sigma_hi"),
    ("/api/jobs", {"prompt": "x", "cache": "quick"}, "cache", "not a preset"),
    # a zero side is an error, not the default size; messages name the route's own fields
    ("/v1/images/generations", openai_body("x", size="0x256"), "size", "the width of size is 0"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 512, "height": 0}, "height", "height is 0"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size", "batch_size × n_iter is 6"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 1, "n_iter": 0}, "n_iter", "n_iter is 0"),
    ("/v1/images/generations", openai_body("x", num_inference_steps=0), "num_inference_steps",
     "num_inference_steps is 0"),
    ("/v1/images/generations", openai_body(" "), "prompt", "prompt is empty"),
    ("/api/jobs", {"prompt": ""}, "prompt", "prompt is empty"),
    ("/api/jobs", {"prompt": "x", "cache": True}, "cache", "cache is true: it must be a preset name"),
    ("/api/jobs", {"prompt": "x", "cache": [0.1, "two"]}, "cache", "[threshold, max_reuse]"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Euler a Karras"}, "sampler_name",
     "Euler a has no Karras noise levels"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DDIM Karras"}, "sampler_name", "no Karras noise levels"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "Exponential"}, "scheduler", "use Automatic"),
    # fields that would change the image are not ignored
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_index": "UniPC"}, "sampler_index", "unknown sampler 'UniPC'"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, "enable_hr", "hires fix) is not supported"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "sdxl.safetensors"}},
     "override_settings", "serves one model, tiny-512: start another `pixart serve --model sdxl.safetensors`"),
    ("/api/jobs", {"prompt": "x", "stpes": 2}, "stpes", "Unrecognized request argument supplied: stpes (the "
     "arguments are prompt, negative_prompt, width, height, steps, guidance_scale, seed, n, scheduler, "
     "guidance_interval, cache)"),
    ("/v1/images/generations", openai_body("x", negative_promt="blurry"), "negative_promt",
     "Unrecognized request argument supplied: negative_promt"),
    ("/v1/images/generations", openai_body("x", background="transparent"), "background", "images are opaque"),
    # a bool or a string is not a number
    ("/api/jobs", {"prompt": "x", "seed": True}, "seed", "valid integer"),
    ("/v1/images/generations", openai_body("x", num_inference_steps="2"), "num_inference_steps", "valid integer"),
    ("/v1/images/generations", openai_body("x", guidance_scale=True), "guidance_scale", "valid number"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": True}, "steps", "valid integer"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "7"}, "cfg_scale", "valid number"),
    ("/api/jobs", {"prompt": "x", "guidance_interval": [0.28, "5"]}, "guidance_interval", "valid number"),
])
def test_bad_fields_answer_400_in_the_error_envelope_naming_the_field(server, path, body, param, says):
    client, gated = server
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and says in error["message"]
    assert gated.calls == []


@pytest.mark.parametrize("path, content, param", [
    ("/v1/images/generations", r'{"prompt": "\ud800 a blue square", "size": "256x256"}', "prompt"),
    ("/sdapi/v1/txt2img", r'{"prompt": "x", "negative_prompt": "a \udfff b"}', "negative_prompt"),
    ("/api/jobs", r'{"prompt": "x\ud83d"}', "prompt"),
])
def test_a_prompt_with_a_lone_surrogate_is_a_400_naming_it(server, path, content, param):
    client, gated = server
    r = client.post(path, content=content.encode(), headers={"Content-Type": "application/json"})  # valid JSON
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]
    assert gated.calls == []


@pytest.mark.parametrize("path, content, param", [
    ("/api/jobs", '{"prompt": "x", "guidance_interval": [0, 1e400]}', "guidance_interval"),  # overflows to infinity
    ("/v1/images/generations", '{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),  # Python's json reads it
    ("/sdapi/v1/txt2img", '{"prompt": "x", "cfg_scale": -Infinity}', "cfg_scale"),
    ("/api/jobs", '{"prompt": "x", "cache": [1e999, 2]}', "cache"),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "override_settings": {"eta_noise_seed_delta": 1e400}}',
     "override_settings"),  # echoed in "parameters"
])
def test_a_number_that_is_not_finite_is_a_400_naming_the_field(server, path, content, param):
    client, gated = server
    r = client.post(path, content=content.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = strict_json(r.text)["error"]
    assert error["param"] == param and "must be finite" in error["message"]
    assert gated.calls == []


def test_responses_are_standard_json_whatever_they_hold():
    assert Json({"message": "caf\xe9 \ud800"}).body == rb'{"message":"caf\u00e9 \ud800"}'
    with pytest.raises(ValueError, match="not JSON compliant"):
        Json({"x": float("inf")})


def test_unknown_routes_methods_and_bad_json_answer_in_the_error_envelope(server):
    client, _ = server
    for r, status in ((client.get("/v1/nothing"), 404), (client.get("/v1/images/generations"), 405),
                      (client.post("/v1/images/generations", content=b"{not json",
                                   headers={"Content-Type": "application/json"}), 400)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("content, content_type, says", [
    (b'{"prompt": "x",', "application/json", "the body is not valid JSON (Expecting property name enclosed in "
                                              "double quotes at character 15)"),
    (b'{"prompt": "\xff\xfe caf\xe9"}', "application/json", "the body could not be read as JSON"),
    (b"prompt=x", "application/x-www-form-urlencoded", "the body is not a JSON object"),
    (b"", "application/json", "the body is missing"),
])
def test_a_body_that_is_not_a_json_object_says_what_to_send(server, content, content_type, says):
    client, gated = server
    r = client.post("/v1/images/generations", content=content, headers={"Content-Type": content_type})
    assert r.status_code == 400
    assert says in r.json()["error"]["message"] and "Content-Type: application/json" in r.json()["error"]["message"]
    assert gated.calls == []


def test_the_key_is_checked_before_the_body_and_a_huge_body_is_refused_unread(server):
    client, gated = server
    bare = httpx.Client(base_url=str(client.base_url), timeout=30)
    assert bare.post("/v1/images/generations", content=b"{not json").status_code == 401
    assert bare.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json").json()["paths"]["/v1/images/generations"]
    r = client.post("/v1/images/generations", json={"prompt": "x", "pad": "a" * (2 << 20)})
    assert r.status_code == 413 and "over 1048576 bytes" in r.json()["error"]["message"]
    assert metric(client, 'pixart_requests_total{route="/v1/images/generations",status="413"}') == 1
    assert bare.head("/health").status_code == 200 and bare.head("/").status_code == 200
    assert gated.calls == []


def test_a1111_sampler_index_is_sampler_names_older_name_and_known_settings_of_no_effect_pass(server):
    client, _ = server
    body = {"prompt": "x", "seed": 1, "steps": 1, "width": 256, "height": 256, "enable_hr": False,
            "override_settings": {"sd_model_checkpoint": "tiny-512", "CLIP_stop_at_last_layers": 2}}
    shown = []
    for fields in ({"sampler_index": "Euler"}, {"sampler_index": "Euler", "sampler_name": "DDIM"}):
        r = client.post("/sdapi/v1/txt2img", json={**body, **fields})
        assert r.status_code == 200, r.text
        shown.append(json.loads(r.json()["info"])["sampler_name"])
    assert shown == ["Euler", "DDIM"]  # sampler_name wins
    # a client without integers (JavaScript's JSON.stringify(20) is 20, but some send 20.0): whole floats are ints
    r = client.post("/sdapi/v1/txt2img", json={**body, "steps": 1.0, "seed": 1.0, "width": 256.0})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["steps"] == 1
    r = client.post("/sdapi/v1/txt2img", json={**body, "steps": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steps"


def test_openai_route_accepts_every_documented_argument(server):
    client, _ = server
    documented = {"model": "pixart", "quality": "high", "style": "vivid", "user": "u-1", "background": "opaque",
                  "moderation": "low", "output_compression": 100, "output_format": "png", "partial_images": 0,
                  "stream": False, "response_format": "b64_json", "n": 1}
    r = client.post("/v1/images/generations", json=openai_body("x", num_inference_steps=1, **documented))
    assert r.status_code == 200, r.text


def test_a_request_without_sampler_gets_the_models_own_whatever_ran_before(server):
    client, _ = server
    schedulers = []
    for sampler in (None, "DDIM", None):
        r = client.post("/v1/images/generations", json=openai_body("x", scheduler=sampler))
        assert r.status_code == 200, r.text
        schedulers.append(json.loads(decode(r.json()["data"][0]["b64_json"]).text["parameters"])["scheduler"])
    assert schedulers == ["DPM++ 2M", "DDIM", "DPM++ 2M"]


def test_a_full_queue_answers_429_with_retry_after_and_every_accepted_request_completes(server):
    client, gated = server
    gated.hold()
    with ThreadPoolExecutor(8) as pool:
        held = pool.submit(client.post, "/v1/images/generations", json=openai_body("held"))
        assert gated.entered.wait(10)  # the worker holds the first job: max_queue (2) can wait behind it
        burst = [pool.submit(client.post, "/v1/images/generations", json=openai_body(f"p{i}", seed=i))
                 for i in range(2 + 5)]
        wait_until(lambda: sum(f.done() for f in burst) == 5 and metric(client, "pixart_queue_size") == 2)
        gated.gate.set()
        responses = [f.result() for f in burst]
        assert held.result().status_code == 200
    rejected = [r for r in responses if r.status_code == 429]
    assert len(rejected) == 5 and sum(r.status_code == 200 for r in responses) == 2
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    assert sum(len(c["prompts"]) for c in gated.calls) == 3


def test_compatible_waiting_requests_run_as_one_batch_equal_to_solo_runs(server, pipe):
    client, gated = server
    gated.hold()
    requests = [("a cat", "dark", 11), ("a dog on grass", "", 22)]
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(client.post, "/v1/images/generations", json=openai_body("held", num_inference_steps=1))
        assert gated.entered.wait(10)
        pair = [pool.submit(client.post, "/v1/images/generations",
                            json=openai_body(prompt, negative_prompt=negative, seed=seed))
                for prompt, negative, seed in requests]
        wait_until(lambda: metric(client, "pixart_queue_size") == 2)
        gated.gate.set()
        assert held.result().status_code == 200
        results = [f.result().json()["data"][0]["b64_json"] for f in pair]
    assert [sorted(c["prompts"]) for c in gated.calls] == [["held"], ["a cat", "a dog on grass"]]  # the pair: one call
    for got, (prompt, negative, seed) in zip(results, requests):
        # same noise, prompt and negative prompt as alone; only the kernels' float rounding may differ: MKL's
        # small-M GEMMs (the timestep embedder at batch 4 vs 2) differ in the last bits, which moves a handful
        # of pixels by one level. A wrong generator or prompt pairing would change every pixel.
        diff = np.abs(np.asarray(decode(got)).astype(int) - reference(pipe, prompt, [seed], negative=negative)[0])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def raw_post(client: httpx.Client, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket, to hang up on it later."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((client.base_url.host, client.base_url.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_batch_that_fails_runs_its_jobs_again_alone_so_only_the_culprits_client_gets_the_error(server, pipe):
    client, gated = server
    gated.hold()
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(client.post, "/v1/images/generations", json=openai_body("held", num_inference_steps=1))
        assert gated.entered.wait(10)
        pair = [pool.submit(client.post, "/v1/images/generations", json=openai_body(prompt, seed=11))
                for prompt in (gated.poison, "a cat")]
        wait_until(lambda: metric(client, "pixart_queue_size") == 2)
        gated.gate.set()
        assert held.result().status_code == 200
        bad, good = (f.result() for f in pair)
    calls = [sorted(c["prompts"]) for c in gated.calls]
    assert calls[:2] == [["held"], ["a cat", "poison"]] and sorted(calls[2:]) == [["a cat"], ["poison"]]
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "cannot take the prompt 'poison'"
    assert good.status_code == 200, good.text
    np.testing.assert_array_equal(np.asarray(decode(good.json()["data"][0]["b64_json"])),
                                  reference(pipe, "a cat", [11])[0])


def test_shutting_down_answers_the_running_and_waiting_requests_503_at_once(pipe):
    gated = GatedPipeline(pipe)
    gated.step_gate.clear()
    with (running(create_app(lambda: gated, model_name="tiny")) as (url, server),
          httpx.Client(base_url=url, timeout=20) as client, ThreadPoolExecutor(2) as pool):
        wait_until(lambda: client.get("/health").status_code == 200)
        first = pool.submit(client.post, "/v1/images/generations", json=openai_body("running"))
        assert gated.stepped.wait(10)
        second = pool.submit(client.post, "/v1/images/generations", json=openai_body("waiting"))
        wait_until(lambda: metric(client, "pixart_queue_size") == 1)
        started = time.monotonic()
        server.should_exit = True  # what uvicorn's SIGINT handler does
        responses = [first.result(), second.result()]
        seconds = time.monotonic() - started
        gated.step_gate.set()
    for r in responses:
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert seconds < 2  # not after uvicorn's graceful-shutdown timeout (5 s): then it sends empty 500s
    wait_until(lambda: gated.calls[0]["stopped"])
    assert [c["prompts"] for c in gated.calls] == [["running"]]


def test_a_client_that_hangs_up_has_its_waiting_job_dropped_and_its_running_job_stopped(server):
    client, gated = server
    gated.hold()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, "/v1/images/generations", json=openai_body("held"))
        assert gated.entered.wait(10)
        waiting = raw_post(client, "/v1/images/generations", openai_body("dropped"))
        wait_until(lambda: metric(client, "pixart_queue_size") == 1)
        waiting.close()
        wait_until(lambda: metric(client, "pixart_queue_size") == 0)  # dropped while the worker is still held
        gated.gate.set()
        assert held.result().status_code == 200
    assert all("dropped" not in c["prompts"] for c in gated.calls)

    gated.stepped.clear()
    gated.step_gate.clear()
    running = raw_post(client, "/v1/images/generations", openai_body("stopped", num_inference_steps=20))
    assert gated.stepped.wait(10)  # the job is inside its first step
    running.close()
    wait_until(lambda: metric(client, "pixart_jobs_cancelled_total") == 2)
    gated.step_gate.set()
    wait_until(lambda: gated.calls[-1]["stopped"])
    assert gated.calls[-1]["prompts"] == ["stopped"] and gated.calls[-1]["steps"] == 1  # of 20


def test_metrics_count_requests_by_route_and_status_images_and_seconds(server):
    client, _ = server
    assert client.post("/v1/images/generations", json=openai_body("x", n=2)).status_code == 200
    assert client.post("/v1/images/generations", json=openai_body("x", n=9)).status_code == 400
    assert httpx.post(f"{client.base_url}/v1/images/generations", json=openai_body("x")).status_code == 401
    assert client.get("/sdapi/v1/samplers").status_code == 200
    text = client.get("/metrics").text
    assert "# TYPE pixart_seconds_per_image histogram" in text
    route = 'pixart_requests_total{route="/v1/images/generations",status="%d"}'
    assert [metric(client, route % s) for s in (200, 400, 401)] == [1, 1, 1]
    assert metric(client, 'pixart_requests_total{route="/sdapi/v1/samplers",status="200"}') == 1
    assert metric(client, "pixart_images_generated_total") == 2 and metric(client, "pixart_batches_total") == 1
    assert metric(client, "pixart_seconds_per_image_count") == 2 and metric(client, "pixart_seconds_per_image_sum") > 0
    assert metric(client, 'pixart_seconds_per_image_bucket{le="+Inf"}') == 2
    assert metric(client, "pixart_queue_size") == 0


def test_health_is_503_while_loading_then_200(pipe):
    loaded = threading.Event()

    def load():
        assert loaded.wait(20)
        return pipe

    with running(create_app(load, model_name="tiny")) as (url, _):
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert httpx.post(f"{url}/v1/images/generations", json=openai_body("x")).status_code == 503
        loaded.set()
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)


def sse(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream."""
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], strict_json(fields["data"])))
    return events


def test_job_events_stream_progress_then_done_and_delete_cancels(server, pipe):
    client, gated = server
    config = client.get("/api/config").json()
    assert {"label": "1:1", "width": 512, "height": 512} in config["sizes"] and "DPM++ 2M" in config["samplers"]
    assert config["defaults"] == {"steps": 20, "guidance_scale": 4.5, "width": 512, "height": 512}
    job = client.post("/api/jobs", json={"prompt": "a tree", "width": 256, "height": 256, "steps": STEPS,
                                         "seed": None}).json()
    events = sse(client.get(f"/api/jobs/{job['job_id']}/events"))
    assert events[:-1] == [("progress", {"step": 1, "total": STEPS}), ("progress", {"step": 2, "total": STEPS})]
    kind, done = events[-1]
    assert kind == "done" and done["seeds"] == job["seeds"] and done["settings"]["prompt"] == "a tree"
    np.testing.assert_array_equal(np.asarray(decode(done["images"][0])), reference(pipe, "a tree", job["seeds"])[0])

    gated.hold()
    held = client.post("/api/jobs", json={"prompt": "held", "steps": 1}).json()
    assert gated.entered.wait(10)
    queued = client.post("/api/jobs", json={"prompt": "never", "steps": 1}).json()
    assert client.delete(f"/api/jobs/{queued['job_id']}").json() == {"job_id": queued["job_id"], "cancelled": True}
    assert sse(client.get(f"/api/jobs/{queued['job_id']}/events")) == [("error", {"message": "the job was cancelled"})]
    gated.gate.set()
    assert sse(client.get(f"/api/jobs/{held['job_id']}/events"))[-1][0] == "done"
    assert client.get("/api/jobs/nope/events").status_code == 404


def test_a1111_progress_models_samplers_and_options(server):
    client, _ = server
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny-512"
    assert {s["name"] for s in client.get("/sdapi/v1/samplers").json()} >= {"DPM++ 2M", "Euler", "DDIM"}
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Karras"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-512"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-512", "CLIP_stop_at_last_layers": 2}
                       ).status_code == 200
    other = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl.safetensors"})
    assert other.status_code == 400 and "serves one model, tiny-512" in other.json()["error"]["message"]


def after_first_step(pipe, prompt: str, seed: int, steps: int) -> np.ndarray:
    """The pipeline's decoding (VAE, resize to 256x256, postprocess) of its estimate of the clean latents after the
    first of `steps` (AUTOMATIC1111's preview; not the still noisy latents)."""
    def stop(pipe, i, t, tensors):
        raise _Stopped(tensors["denoised"], i + 1)

    with pytest.raises(_Stopped) as stopped:
        pipe(prompt, num_inference_steps=steps, width=256, height=256, callback_on_step_end=stop,
             callback_on_step_end_tensor_inputs=["denoised"], generator=[torch.Generator().manual_seed(seed)])
    images = resize_and_crop_tensor(pipe.decode_latents(stopped.value.latents), 256, 256)
    return np.asarray(pipe.image_processor.postprocess(images, output_type="pil")[0])


def test_a1111_interrupt_answers_200_with_the_image_so_far_and_spares_waiting_and_other_apis_jobs(server, pipe):
    client, gated = server
    body = {"prompt": "a blue square", "seed": 3, "steps": 10, "width": 256, "height": 256}
    gated.step_gate.clear()
    with ThreadPoolExecutor(2) as pool:
        job = pool.submit(client.post, "/sdapi/v1/txt2img", json=body)
        assert gated.stepped.wait(10)
        busy = client.get("/sdapi/v1/progress").json()
        assert busy["state"]["sampling_steps"] == 10 and busy["state"]["job_count"] == 1
        waiting = pool.submit(client.post, "/sdapi/v1/txt2img", json={**body, "steps": STEPS})
        wait_until(lambda: metric(client, "pixart_queue_size") == 1)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        gated.step_gate.set()
        r, later = job.result(), waiting.result()
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and info["steps_run"] == 1 and info["steps"] == 10
    assert gated.calls[0]["steps"] == 1 and gated.calls[0]["stopped"]
    image = decode(r.json()["images"][0])
    assert {k: v for k, v in json.loads(image.text["parameters"]).items() if k.startswith(("steps", "inter"))} == \
        {"steps": 10, "steps_run": 1, "interrupted": True}
    np.testing.assert_array_equal(np.asarray(image), after_first_step(pipe, "a blue square", 3, steps=10))
    assert later.status_code == 200 and json.loads(later.json()["info"])["steps_run"] == STEPS  # not interrupted
    assert json.loads(later.json()["info"])["interrupted"] is False

    gated.stepped.clear()
    gated.step_gate.clear()
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(client.post, "/v1/images/generations", json=openai_body("a red circle"))
        assert gated.stepped.wait(10)
        assert client.post("/sdapi/v1/interrupt").status_code == 200  # an OpenAI job is not A1111's to stop
        gated.step_gate.set()
        r = other.result()
    assert r.status_code == 200 and gated.calls[-1]["steps"] == STEPS
    np.testing.assert_array_equal(np.asarray(decode(r.json()["data"][0]["b64_json"])),
                                  reference(pipe, "a red circle", [5])[0])


def test_the_openai_sdk_parses_the_response(server, pipe):
    openai = pytest.importorskip("openai")
    client, _ = server
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=KEY, max_retries=0)
    result = sdk.images.generate(prompt="a small cactus", n=1, size="256x256", response_format="b64_json",
                                 extra_body={"seed": 3, "num_inference_steps": STEPS})
    want = reference(pipe, "a small cactus", [3])[0]
    np.testing.assert_array_equal(np.asarray(decode(result.data[0].b64_json)), want)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_n = 4"):
        sdk.images.generate(prompt="x", n=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_raises_the_load_error_and_stops(tmp_path):
    args = build_parser().parse_args(["serve", "--model", str(tmp_path / "missing"), "--port", str(free_port())])
    with pytest.raises(FileNotFoundError, match="missing"):
        serve(args)


@pytest.mark.parametrize("args, says", [
    (["--port", "99999"], "pixart serve: error: argument --port: 99999 is not a TCP port"),
    (["--port", "PORT", "--dtype", "fp32", "--device", "cpu"], "pixart: error: "),  # with a truncated weight file
])
def test_pixart_serve_reports_a_bad_model_or_port_in_one_line(pipeline_dir_512, tmp_path, args, says):
    model = tmp_path / "model"
    shutil.copytree(pipeline_dir_512, model)
    weights = next((model / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    args = [str(free_port()) if a == "PORT" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "pixart", "serve", "--model", str(model), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(says), proc.stderr
    assert sum("error" in line.lower() for line in proc.stderr.splitlines()) == 1, proc.stderr


def test_pixart_serve_command_listens_loads_and_stops_on_ctrl_c(pipeline_dir_512):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pixart", "serve", "--model", str(pipeline_dir_512), "--port",
                             str(port), "--dtype", "fp32", "--device", "cpu", "--api-key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=60)
        assert httpx.get(f"{url}/api/config", headers=AUTH).json()["model"] == str(pipeline_dir_512)
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130  # `pixart: interrupted`, after uvicorn's graceful shutdown
