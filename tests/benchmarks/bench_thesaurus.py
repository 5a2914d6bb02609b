"""Thesaurus benchmark: build speed, plausibility of its choices, and gRPC lookups.

    .venv/bin/python tests/benchmarks/bench_thesaurus.py [--captions 1000000]

1. **Build speed.** The reference world's captions are written to a file first
   (not timed); then the index is built from that file, the way an operator builds
   one from their own corpus: read, normalise, count. Reported per million captions.
2. **Plausibility.** For each validation scene of the reference world, objects are
   drawn for its background as the compose stage draws them (∝ R above
   `thesaurus.min_relation`, from the index the service serves by default; also
   with no floor, so that the corpus's rare odd pairings can be drawn), and, as the
   baseline, uniformly from the configured classes. A choice is plausible
   when the world's rules let that class appear on that background at all.
3. **Lookups.** A real `freemask serve thesaurus` process on a private embedded
   stack; a client calls `Relation` and `TopObjects` one after another, then from
   several threads at once. Client and server share the machine's cores.

Writes tests/benchmarks/results/thesaurus.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from ports import reserve_ports  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402

from freemask.shared.config import FreemaskConfig, StackConfig, load_config  # noqa: E402
from freemask.shared.grpc_runtime import check_health  # noqa: E402
from freemask.shared.processes import stop_pid  # noqa: E402
from freemask.shared.stack import EmbeddedStack  # noqa: E402
from freemask.shared.store import ObjectStore  # noqa: E402
from freemask.thesaurus.corpus import file_corpus, reference_corpus  # noqa: E402
from freemask.thesaurus.index import ThesaurusIndex, build_index  # noqa: E402
from freemask.thesaurus.plan import draw_objects, plan_rng  # noqa: E402
from freemask.thesaurus.service import IndexRepository, normalizer_for  # noqa: E402
from freemask.v1 import thesaurus_pb2  # noqa: E402
from freemask.world import VAL_SIZE, World, class_weights, scene_spec  # noqa: E402

RESULTS = HERE / "results"
SEED = 0
OBJECTS_PER_SCENE = 3


def build_seconds(config: FreemaskConfig, captions: int, workdir: Path) -> tuple[float, ThesaurusIndex]:
    path = workdir / "captions.txt"
    with open(path, "w", encoding="utf-8") as out:
        for caption in tqdm(reference_corpus(config, captions, seed=SEED + 1), total=captions, desc="write corpus",
                            unit="cap", mininterval=1.0):
            out.write(caption + "\n")
    started = time.perf_counter()
    index = build_index(file_corpus(path), normalizer_for(config), {"name": "bench"})
    return time.perf_counter() - started, index


def plausibility(config: FreemaskConfig, index: ThesaurusIndex, min_relation: float) -> dict[str, object]:
    world = World.from_config(config.world)
    backgrounds = [scene_spec("val", i, world=world).background for i in range(VAL_SIZE)]
    uniform = np.random.default_rng(SEED)
    thesaurus_ok, random_ok = [], []
    by_background: dict[str, list[bool]] = {}
    for i, background in enumerate(backgrounds):
        allowed = class_weights(background, config.world.classes)
        drawn = draw_objects(index, background, OBJECTS_PER_SCENE, min_relation, plan_rng(SEED + i))
        oks = [allowed[r.object_name] > 0 for r in drawn]
        thesaurus_ok += oks
        by_background.setdefault(background, []).extend(oks)
        random_ok += [allowed[str(c)] > 0 for c in uniform.choice(config.world.classes, OBJECTS_PER_SCENE)]
    return {"plausible_rate": float(np.mean(thesaurus_ok)), "plausible_rate_random": float(np.mean(random_ok)),
            "plausible_rate_by_background": {b: round(float(np.mean(v)), 4) for b, v in sorted(by_background.items())},
            "draws": len(thesaurus_ok), "val_scenes": len(backgrounds)}


def lookups_per_s(target: str, calls: int, threads: int) -> dict[str, float]:
    pairs = [("boat", "sea"), ("car", "road"), ("planes", "sky"), ("dog", "grass"), ("people", "room")]
    with grpc.insecure_channel(target) as channel:
        relation = channel.unary_unary("/freemask.v1.Thesaurus/Relation",
                                       request_serializer=thesaurus_pb2.RelationRequest.SerializeToString,
                                       response_deserializer=thesaurus_pb2.RelationResponse.FromString)
        top = channel.unary_unary("/freemask.v1.Thesaurus/TopObjects",
                                  request_serializer=thesaurus_pb2.TopObjectsRequest.SerializeToString,
                                  response_deserializer=thesaurus_pb2.TopObjectsResponse.FromString)
        requests = [thesaurus_pb2.RelationRequest(object_name=o, background_name=b) for o, b in pairs]
        tops = [thesaurus_pb2.TopObjectsRequest(background_name=b, k=5, min_relation=0.05) for _, b in pairs]
        for request in requests:  # warm the channel
            relation(request, timeout=10)

        def timed(call, batch) -> float:
            started = time.perf_counter()
            for i in range(calls):
                call(batch[i % len(batch)], timeout=10)
            return calls / (time.perf_counter() - started)

        def concurrent() -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda i: relation(requests[i % len(requests)], timeout=10), range(calls)))
            return calls / (time.perf_counter() - started)

        return {"relation": timed(relation, requests), "top_objects": timed(top, tops),
                f"relation_{threads}_client_threads": concurrent()}


def serve_and_measure(config: FreemaskConfig, index: ThesaurusIndex, calls: int, threads: int,
                      workdir: Path) -> tuple[dict[str, float], str]:
    base = reserve_ports(19)[0]
    stack = EmbeddedStack(StackConfig(data_dir=workdir / "stack", s3_port=base, kafka_port=base + 1,
                                      seaweed_port_base=base + 5))
    stack.up(("seaweedfs", "tansu"), progress=print)
    process = None
    try:
        version = IndexRepository(ObjectStore(stack.store_config())).publish(index)
        grpc_port, metrics_port = base + 17, base + 18
        env = {**os.environ, **stack.client_env(), "FREEMASK_THESAURUS__VERSION": version,
               "FREEMASK_SERVER__PORTS__THESAURUS__GRPC_PORT": str(grpc_port),
               "FREEMASK_SERVER__PORTS__THESAURUS__METRICS_PORT": str(metrics_port)}
        log = open(workdir / "thesaurus.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "freemask.shared.cli", "serve", "thesaurus"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 60
        while not check_health(target, timeout_s=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"thesaurus service did not start:\n{(workdir / 'thesaurus.log').read_text()}")
            time.sleep(0.2)
        return lookups_per_s(target, calls, threads), version
    finally:
        if process is not None:
            stop_pid(process.pid)
            process.wait(timeout=30)
        stack.down(progress=print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=1_000_000, help="captions in the timed build")
    parser.add_argument("--calls", type=int, default=3000, help="gRPC calls per measurement")
    parser.add_argument("--threads", type=int, default=4, help="client threads of the concurrent measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = load_config(environ={})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, _ = build_seconds(config, args.captions, Path(tmp))
        print(f"built {args.captions} captions in {seconds:.1f} s", file=sys.stderr)
        served = build_index(reference_corpus(config, config.thesaurus.reference_captions,
                                              config.thesaurus.reference_seed),
                             normalizer_for(config), {"name": "reference"})
        plausible = plausibility(config, served, config.thesaurus.min_relation)
        unfiltered = plausibility(config, served, 0.0)["plausible_rate"]
        print(f"plausibility: {json.dumps(plausible)}", file=sys.stderr)
        lookups, version = serve_and_measure(config, served, args.calls, args.threads, Path(tmp))
    commit = git_commit()
    result = {
        "plausible_rate": round(plausible["plausible_rate"], 4),
        "plausible_rate_random": round(plausible["plausible_rate_random"], 4),
        "lookups_per_s": round(lookups["relation"], 1),
        "build_seconds_per_million": round(seconds / (args.captions / 1e6), 2),
        "lookups_per_s_by_call": {name: round(rate, 1) for name, rate in lookups.items()},
        "plausible_rate_by_background": plausible["plausible_rate_by_background"],
        "plausible_rate_min_relation_0": round(unfiltered, 4),
        "draws": plausible["draws"], "val_scenes": plausible["val_scenes"],
        "build_captions": args.captions, "build_seconds": round(seconds, 2),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": commit or None,
        "seed": SEED,
        "config": {"served_index": version, "reference_captions": config.thesaurus.reference_captions,
                   "reference_seed": config.thesaurus.reference_seed, "min_relation": config.thesaurus.min_relation,
                   "objects_per_scene": OBJECTS_PER_SCENE, "calls": args.calls, "client_threads": args.threads,
                   "build_corpus": f"reference world, seed {SEED + 1}, plain text file",
                   "cpus": os.cpu_count()},
    }
    write_json(args.out, "thesaurus.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
