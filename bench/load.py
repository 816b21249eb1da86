"""Load test of `pixart serve` on the tiny model: requests per minute and p50/p95 latency by concurrency and batching.

Starts the real server (`python -m pixart serve`) once per --max-batch setting, sends one warm-up request, then for
each client count a fixed number of requests (each with its own prompt and seed) from that many concurrent clients,
repeated --repeats times with the configurations interleaved; prints one JSON line per configuration with the
medians, and each rpm as a ratio of the unbatched (smallest --max-batch) rpm at the same concurrency.

    python bench/load.py                        # the tiny 512 test model, 1/4/16 clients, --max-batch 1 and 4
    python bench/load.py --model PixArt-alpha/PixArt-XL-2-512x512 --device cuda --steps 20
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def tiny_model() -> Path:
    """The 512 test folder of tests/conftest.py, built by diffusers (a test dependency) in a temporary folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_pipeline_folder, train_spm

    root = Path(tempfile.mkdtemp())
    return build_pipeline_folder(root, train_spm(root), 64, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "pixart", "serve", "--model", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", str(max(args.clients) * 2),
                             "--device", args.device, "--dtype", args.dtype], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            proc.kill()
            raise RuntimeError(f"the server did not become healthy:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)[1])


async def run_clients(url: str, clients: int, requests: int, args: argparse.Namespace) -> list[float]:
    """Latencies of `requests` requests sent by `clients` concurrent clients, each sending one at a time."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {"prompt": f"a lighthouse on a cliff, variation {i}", "seed": i, "size": args.size,
                    "num_inference_steps": args.steps}
            started = time.perf_counter()
            r = await http.post(f"{url}/v1/images/generations", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=args.timeout) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(clients))), args.timeout)
    return latencies


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the tiny test model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=32, help="requests per configuration and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="the configurations run interleaved; medians reported")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration and repeat")
    args = parser.parse_args()
    model = args.model or str(tiny_model())
    servers = {}
    try:
        for max_batch in args.max_batch:  # all servers up at once: configurations interleave against drift
            servers[max_batch] = start_server(model, max_batch, args)
            asyncio.run(run_clients(servers[max_batch][1], 1, 1, args))  # warm-up, excluded
        runs: dict[tuple[int, int], list[dict]] = {}
        for _ in range(args.repeats):
            for clients in args.clients:
                for max_batch, (_, url) in servers.items():
                    runs.setdefault((clients, max_batch), []).append(measure(url, clients, args))
        for (clients, max_batch), results in runs.items():
            rpm = statistics.median(r["rpm"] for r in results)
            unbatched = statistics.median(r["rpm"] for r in runs[clients, min(servers)])
            print(json.dumps({
                "clients": clients, "max_batch": max_batch, "requests": args.requests, "repeats": args.repeats,
                "steps": args.steps, "size": args.size, "device": args.device, "rpm": round(rpm, 1),
                **{k: round(statistics.median(r[k] for r in results), 3)
                   for k in ("p50_s", "p95_s", "images_per_batch")},
                f"rpm_vs_max_batch_{min(servers)}": round(rpm / unbatched, 2),
            }), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGINT)
            proc.wait(30)


def measure(url: str, clients: int, args: argparse.Namespace) -> dict[str, float]:
    """Requests per minute, p50/p95 latency and images per pipeline call of one run."""
    images, batches = metric(url, "pixart_images_generated_total"), metric(url, "pixart_batches_total")
    started = time.perf_counter()
    latencies = asyncio.run(run_clients(url, clients, args.requests, args))
    wall = time.perf_counter() - started
    images = metric(url, "pixart_images_generated_total") - images
    batches = metric(url, "pixart_batches_total") - batches
    return {"rpm": len(latencies) / wall * 60, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "images_per_batch": images / batches}


if __name__ == "__main__":
    main()
