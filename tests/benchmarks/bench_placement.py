"""Placement benchmark: are FOPA's boxes plausible, and what does Triton's batching buy?

    .venv/bin/python tests/benchmarks/bench_placement.py [--pairs 500]
    .venv/bin/python tests/benchmarks/bench_placement.py --target embedded-gpu   # on a GPU host: Triton only

1. **Quality on held-out reference scenes.** Each validation scene of the reference
   world (64 px, with the objects already in it) gets a foreground of a class that
   lives on its background (drawn by the world's class weights), rendered with a seed
   the training never used. The service's core (`placer.place`, overlap limit
   `placement.max_overlap` against the scene's objects) picks a box from the shipped
   weights' heatmaps. Reported: the share of chosen boxes the world's rules call
   plausible, and the mean IoU of each chosen box with the nearest legal box of the
   heatmap grid (same aspect). The baseline picks uniformly among the same candidate
   boxes (inside the image, within the overlap limit). For reference, the world's own
   legal heatmaps are scored the same way (see `LegalHeatmaps` for why they miss too).
2. **Triton.** A private tritonserver serves the model twice: `fopa` with dynamic
   batching and `fopa_unbatched` without. 8 client threads send one pair per request;
   throughput with ÷ without is the batching gain. The latency is the median round
   trip of one pair sent alone to `fopa`. The ONNX model alone, in-process at batch 1
   and 8, shows how much of a pair's cost batching could save at all; so does the CPU
   time per pair of the server (tritonserver and its python stubs) and of the client
   threads in each mode, and the model's FLOPs per pair against one core's time.

With `--target embedded-gpu` only part 2 runs, with the repository of that target (the
python backend running FOPA with torch on the first CUDA device). Its headline clients
are 8 processes, one request in flight each: 8 threads of one process share one GIL,
which caps the batched rate on a GPU (their figure is kept beside it). The results go to
tests/benchmarks/results/placement_gpu.json with the card's name. Otherwise the results go
to tests/benchmarks/results/placement.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import tritonclient.grpc as grpcclient
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from ports import reserve_ports  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402

from freemask.placement.dataset import legal_heatmaps, render_single_object  # noqa: E402
from freemask.placement.geometry import (  # noqa: E402
    background_input,
    candidate_boxes,
    foreground_aspect,
    foreground_input,
    inside_image,
)
from freemask.placement.model import DEFAULT_WEIGHTS_DIR, FopaHeatmap, load_fopa, weights_version  # noqa: E402
from freemask.placement.placer import PlacementQuery, place  # noqa: E402
from freemask.placement.triton_repo import (  # noqa: E402
    EMBEDDED_INTRA_OP_THREADS,
    MODEL_VERSION,
    TARGET_SPECS,
    write_repository,
)
from freemask.shared.config import load_config  # noqa: E402
from freemask.shared.processes import stop_pid  # noqa: E402
from freemask.shared.triton_server import start_tritonserver  # noqa: E402
from freemask.world import VAL_SIZE, class_weights, dataset, is_plausible  # noqa: E402

RESULTS = HERE / "results"
SEED = 0
IMAGE_SIDE = 64
CONCURRENCY = 8


def val_pairs(count: int, classes: tuple[str, ...]) -> list[tuple[PlacementQuery, str, str]]:
    """(query, class, background) for the first `count` validation scenes."""
    rng = np.random.default_rng([SEED, 2026])
    max_overlap = load_config(environ={}).placement.max_overlap
    pairs = []
    for index in range(count):
        scene = dataset("val", index % VAL_SIZE, IMAGE_SIDE)
        weights = class_weights(scene.background, classes)
        names = [c for c in classes if weights[c] > 0]
        p = np.array([weights[c] for c in names])
        cls = names[int(rng.choice(len(names), p=p / p.sum()))]
        image, mask = render_single_object(rng, cls)
        occupied = tuple((x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in (o.box for o in scene.objects))
        query = PlacementQuery(background=scene.image, foreground=image, foreground_mask=mask,
                               occupied=occupied, max_overlap=max_overlap, seed=index)
        pairs.append((query, cls, scene.background))
    return pairs


class TorchHeatmaps:
    def __init__(self) -> None:
        self.model = FopaHeatmap(load_fopa()).eval()

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(backgrounds), torch.from_numpy(foregrounds)).numpy()


class UniformHeatmaps:
    """The baseline: every candidate box equally likely (ties broken by the query's seed)."""

    def __init__(self, chunk: list[tuple[PlacementQuery, str, str]]) -> None:
        self.count = len(chunk)

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        return np.ones((self.count, 8, 32, 32), dtype=np.float32)


class LegalHeatmaps:
    """A reference point: the world's own legal heatmaps (1 on every legal cell, ties broken by
    the seed). It can still miss: a legal cell's box, rounded to whole pixels, can fall just
    outside a rule, and the scene's objects can leave no legal cell within the overlap limit."""

    def __init__(self, chunk: list[tuple[PlacementQuery, str, str]]) -> None:
        self.maps = np.stack([legal_heatmaps(cls, background, foreground_aspect(query.foreground_mask))
                              for query, cls, background in chunk]).astype(np.float32)

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        return self.maps


def nearest_legal_iou(box: tuple[int, int, int, int], cls: str, background: str, aspect: float) -> float:
    """IoU of a pixel box with the legal cell box of the heatmap grid that overlaps it most."""
    cells = candidate_boxes(aspect, IMAGE_SIDE, IMAGE_SIDE)
    legal = cells[legal_heatmaps(cls, background, aspect) & inside_image(cells)] * IMAGE_SIDE
    if len(legal) == 0:
        return 0.0
    x, y, w, h = box
    ix = np.clip(np.minimum(legal[:, 2], x + w) - np.maximum(legal[:, 0], x), 0, None)
    iy = np.clip(np.minimum(legal[:, 3], y + h) - np.maximum(legal[:, 1], y), 0, None)
    inter = ix * iy
    union = w * h + (legal[:, 2] - legal[:, 0]) * (legal[:, 3] - legal[:, 1]) - inter
    return float((inter / union).max())


def quality(pairs: list[tuple[PlacementQuery, str, str]], source_for) -> dict[str, float]:
    """`source_for(chunk)` gives the heatmap source of a chunk of pairs. A pair with no box
    within the overlap limit counts as a miss with IoU 0."""
    ok, ious, no_box = [], [], 0
    for start in range(0, len(pairs), 64):
        chunk = pairs[start:start + 64]
        for (query, cls, background), result in zip(chunk, place([q for q, _, _ in chunk], source_for(chunk))):
            if result.best is None:
                ok.append(False)
                ious.append(0.0)
                no_box += 1
                continue
            x, y, w, h = result.best.box
            ok.append(is_plausible(cls, background, (x, y, x + w, y + h), IMAGE_SIDE))
            ious.append(nearest_legal_iou(result.best.box, cls, background, foreground_aspect(query.foreground_mask)))
    return {"rule_rate": float(np.mean(ok)), "box_iou": float(np.mean(ious)), "no_box": no_box}


def model_inputs(pairs: list[tuple[PlacementQuery, str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(background_input(query.background)[None], foreground_input(query.foreground, query.foreground_mask)[None])
            for query, _, _ in pairs]


def triton_inputs(arrays: list[tuple[np.ndarray, np.ndarray]]) -> list[list[grpcclient.InferInput]]:
    requests = []
    for bg, fg in arrays:
        inputs = [grpcclient.InferInput("BACKGROUND", list(bg.shape), "FP32"),
                  grpcclient.InferInput("FOREGROUND", list(fg.shape), "FP32")]
        inputs[0].set_data_from_numpy(bg)
        inputs[1].set_data_from_numpy(fg)
        requests.append(inputs)
    return requests


def throughput(url: str, model: str, requests: list, threads: int) -> float:
    clients = [grpcclient.InferenceServerClient(url) for _ in range(threads)]
    try:
        for inputs in requests[:threads]:  # warm up
            clients[0].infer(model, inputs, client_timeout=30)
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: clients[i % threads].infer(model, requests[i], client_timeout=30),
                          range(len(requests))))
        return len(requests) / (time.perf_counter() - started)
    finally:
        for client in clients:
            client.close()


def _client_process(url: str, model: str, arrays: list[tuple[np.ndarray, np.ndarray]], count: int,
                    barrier: Any, finished: Any) -> None:
    requests = triton_inputs(arrays)
    with grpcclient.InferenceServerClient(url) as client:
        client.infer(model, requests[0], client_timeout=30)  # warm up
        barrier.wait()
        for i in range(count):
            client.infer(model, requests[i % len(requests)], client_timeout=30)
    finished.put(time.monotonic())


def throughput_processes(url: str, model: str, arrays: list[tuple[np.ndarray, np.ndarray]], total: int,
                         processes: int) -> float:
    """Like `throughput`, with one client process per concurrent request: no shared GIL caps the load."""
    context = multiprocessing.get_context("spawn")  # a forked gRPC client is not safe
    barrier, finished = context.Barrier(processes + 1), context.Queue()
    share = total // processes
    workers = [context.Process(target=_client_process, daemon=True, args=(
        url, model, [arrays[(i * share + j) % len(arrays)] for j in range(min(share, len(arrays)))], share,
        barrier, finished)) for i in range(processes)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=300)  # every client started and warmed up (monotonic time is system-wide)
        started = time.monotonic()
        return share * processes / (max(finished.get(timeout=300) for _ in workers) - started)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def latency_ms(url: str, model: str, requests: list, count: int) -> float:
    client = grpcclient.InferenceServerClient(url)
    try:
        times = []
        for i in range(count):
            started = time.perf_counter()
            client.infer(model, requests[i % len(requests)], client_timeout=30)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        client.close()


def onnx_ms_per_pair(path: Path, requests: list[tuple[np.ndarray, np.ndarray]], batch: int, runs: int = 40,
                     threads: int = EMBEDDED_INTRA_OP_THREADS) -> float:
    """The model alone, in this process (by default with the embedded server's thread count): what
    batching can save in compute (as opposed to per-request overhead)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"BACKGROUND": np.concatenate([bg for bg, _ in requests[:batch]]),
             "FOREGROUND": np.concatenate([fg for _, fg in requests[:batch]])}
    session.run(None, feeds)
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    return (time.perf_counter() - started) / runs / batch * 1000


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and every live descendant (tritonserver and its python stubs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += process_tree_cpu_seconds(int(child))
    return total


def this_process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def model_cost(path: Path, arrays: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Why batching gains little on a CPU: one core's time per pair does not fall with the batch,
    because onnxruntime already runs the convolutions near the core's arithmetic rate at batch 1."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        load_fopa().eval()(*(torch.from_numpy(array) for array in arrays[0]))
    gflop = counter.get_total_flops() / 1e9
    one_core = {f"batch_{batch}": onnx_ms_per_pair(path, arrays, batch, threads=1) for batch in (1, 8)}
    return {"gflop_per_pair": round(gflop, 4),
            "onnxruntime_one_thread_ms_per_pair": {key: round(ms, 3) for key, ms in one_core.items()},
            "onnxruntime_one_thread_gflop_per_s": round(gflop / (one_core["batch_1"] / 1000), 1)}


def triton_rates(target: str, arrays: list[tuple[np.ndarray, np.ndarray]], request_count: int, trials: int,
                 clients: tuple[str, ...]) -> dict[str, Any]:
    """Part 2 for `target`'s repository: throughput with and without dynamic batching for each kind of
    client in `clients` (the first is the headline), and latency."""
    requests = triton_inputs(arrays)
    requests = (requests * (request_count // len(requests) + 1))[:request_count]
    measure = {"threads": lambda url, model: throughput(url, model, requests, CONCURRENCY),
               "processes": lambda url, model: throughput_processes(url, model, arrays, request_count, CONCURRENCY)}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        model_file = write_repository(target, repository) / MODEL_VERSION / TARGET_SPECS[target].model_file
        if target == "embedded":
            extra["onnxruntime_ms_per_pair"] = {f"batch_{batch}": round(onnx_ms_per_pair(model_file, arrays, batch), 3)
                                                for batch in (1, 8)}
            extra.update(model_cost(model_file, arrays))
        write_repository(target, repository, name="fopa_unbatched", dynamic_batching=False)
        http_port, grpc_port, metrics_port = reserve_ports(3)
        server = start_tritonserver(repository, Path(tmp) / "work", http_port, grpc_port, metrics_port,
                                    Path(tmp) / "tritonserver.log")
        url = f"127.0.0.1:{grpc_port}"
        try:
            rates: dict[tuple[str, str], list[float]] = {}
            # CPU seconds per pair, of the server (tritonserver and its stubs) and of this process
            cpu: dict[tuple[str, str, str], list[float]] = {}
            for _ in range(trials):  # interleaved, so drift hits all alike
                for client in clients:
                    for model in ("fopa_unbatched", "fopa"):
                        server_before, client_before = process_tree_cpu_seconds(server.pid), this_process_cpu_seconds()
                        rates.setdefault((client, model), []).append(measure[client](url, model))
                        for side, spent in (("server", process_tree_cpu_seconds(server.pid) - server_before),
                                            ("client", this_process_cpu_seconds() - client_before)):
                            cpu.setdefault((client, model, side), []).append(spent / request_count)
            latency = latency_ms(url, "fopa", requests, 200)
            latency_unbatched = latency_ms(url, "fopa_unbatched", requests, 200)
        finally:
            stop_pid(server.pid)
    modes = {"dynamic_batching": "fopa", "no_batching": "fopa_unbatched"}

    def cpu_ms(client: str, side: str) -> dict[str, float]:
        return {mode: round(1000 * statistics.median(cpu[client, model, side]), 3) for mode, model in modes.items()}

    by_client = {client: {"triton_batching_gain": round(statistics.median(rates[client, "fopa"])
                                                        / statistics.median(rates[client, "fopa_unbatched"]), 3),
                          "pairs_per_s_concurrency_8": {mode: round(statistics.median(rates[client, model]), 1)
                                                        for mode, model in modes.items()},
                          "server_cpu_ms_per_pair": cpu_ms(client, "server")}
                 for client in clients}
    if "threads" in clients:  # the client threads run in this process, so its CPU time is theirs
        by_client["threads"]["client_cpu_ms_per_pair"] = cpu_ms("threads", "client")
    headline, *others = clients
    return {
        "triton_batching_gain": by_client[headline]["triton_batching_gain"],
        "latency_ms_per_pair": round(latency, 2),
        "pairs_per_s_concurrency_8": by_client[headline]["pairs_per_s_concurrency_8"],
        **{key: by_client[headline][key] for key in ("server_cpu_ms_per_pair", "client_cpu_ms_per_pair")
           if key in by_client[headline]},
        "latency_ms_per_pair_no_batching": round(latency_unbatched, 2),
        **({"clients": headline, "other_clients": {client: by_client[client] for client in others}} if others else {}),
        **extra,
    }


def gpu_main(args: argparse.Namespace) -> None:
    """`--target embedded-gpu`: part 2 alone, on the first CUDA device."""
    if not torch.cuda.is_available() and args.out is None:
        raise SystemExit("no CUDA device: embedded-gpu would measure torch on the CPU; pass --out to check the "
                         "script anyway without touching results/placement_gpu.json")
    started = time.perf_counter()
    pairs = val_pairs(args.pairs, load_config(environ={}).world.classes)
    # 8 client processes first: on a GPU host, 8 threads sharing one GIL cap the batched rate (their figure
    # is kept beside it); the CPU figure keeps threads, which leave the 2 cores to the server
    triton = triton_rates(args.target, model_inputs(pairs), args.requests, args.trials, ("processes", "threads"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {
        "device": device,
        **triton,
        "pairs": len(pairs),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": args.commit or git_commit(),
        "seed": SEED,
        "config": {"weights_version": weights_version(DEFAULT_WEIGHTS_DIR), "concurrency": CONCURRENCY,
                   "requests_per_run": args.requests, "trials": args.trials, "torch": torch.__version__,
                   "triton": "embedded tritonserver 2.51, python backend + torch.export program (KIND_MODEL)",
                   "cpus": os.cpu_count()},
    }
    write_json(args.out or RESULTS, "placement_gpu.json", result)
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=VAL_SIZE, help="validation scenes to place into")
    parser.add_argument("--requests", type=int, default=1600, help="Triton requests per throughput run")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--target", choices=("embedded", "embedded-gpu"), default="embedded",
                        help="the Triton repository to measure; embedded-gpu measures Triton alone")
    parser.add_argument("--out", type=Path, help=f"results directory (default: {RESULTS})")
    parser.add_argument("--commit", help="the commit measured, where the tree has no git metadata")
    args = parser.parse_args()
    if args.target == "embedded-gpu":
        gpu_main(args)
        return
    torch.set_num_threads(2)
    started = time.perf_counter()
    config = load_config(environ={})
    pairs = val_pairs(args.pairs, config.world.classes)
    model = TorchHeatmaps()
    model_quality = quality(pairs, lambda chunk: model)
    random_quality = quality(pairs, UniformHeatmaps)
    legal_quality = quality(pairs, LegalHeatmaps)
    alone = quality([(replace(query, occupied=()), cls, background) for query, cls, background in pairs],
                    lambda chunk: model)
    print(f"quality: model {model_quality}, random {random_quality}, legal {legal_quality}", file=sys.stderr)

    arrays = model_inputs(pairs)
    triton = triton_rates(args.target, arrays, args.requests, args.trials, ("threads",))
    result = {
        "rule_rate": round(model_quality["rule_rate"], 4),
        "rule_rate_random": round(random_quality["rule_rate"], 4),
        "box_iou": round(model_quality["box_iou"], 4),
        "box_iou_random": round(random_quality["box_iou"], 4),
        **triton,
        "rule_rate_legal_heatmaps": round(legal_quality["rule_rate"], 4),
        "rule_rate_without_scene_objects": round(alone["rule_rate"], 4),
        "no_box_within_overlap_limit": model_quality["no_box"],
        "pairs": len(pairs),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": args.commit or git_commit(),
        "seed": SEED,
        "config": {"weights_version": weights_version(DEFAULT_WEIGHTS_DIR), "image_side": IMAGE_SIDE,
                   "max_overlap": config.placement.max_overlap, "concurrency": CONCURRENCY,
                   "requests_per_run": args.requests, "trials": args.trials, "device": "cpu",
                   "triton": "embedded tritonserver 2.51, python backend + onnxruntime", "cpus": os.cpu_count()},
    }
    write_json(args.out or RESULTS, "placement.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
