"""Pipeline benchmark: what the bus costs, and where the time goes.

    .venv/bin/python tests/benchmarks/bench_pipeline.py [--samples 24]

The same work twice, on one private embedded stack (SeaweedFS, Tansu, tritonserver):

1. **Services.** Every service as its own process; the coordinator runs one round of
   Algorithm 1 (D_0 of `--samples` single objects, f_0 trained on it, then D'_0 of
   `--samples` slots, half of them composed scenes, each scored). Timed: D'_0, from the
   moment its slots exist (f_0 trained) until the round is complete.
2. **One process.** The same run settings and seed, so the same prompts, seeds and
   classes: the coordinator's state machine and every stage's own handler, called
   directly with the messages the bus would have carried (a polled batch of up to
   `bus.max_poll_records` per call, as the workers do), against the same store and
   tritonserver. Timed the same way.

`bus_throughput_ratio` = samples/s through the services ÷ samples/s in one process (1.0
means the bus costs nothing). `stage_seconds` = seconds each stage spent per message it
handled, from the services' Prometheus metrics; `offset_gaps` = how often a stage's consumer met
an offset Tansu had not yet written and waited for it, `skipped_offsets` = offsets it gave up on.

Writes tests/benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "integration"))

from in_process import InProcessPlatform  # noqa: E402
from ports import reserve_ports  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402

from freemask.coordinator.job import StageTotals, stage_totals  # noqa: E402
from freemask.coordinator.rounds import RunMachine, Train  # noqa: E402
from freemask.scoring.models import SegmenterStore  # noqa: E402
from freemask.scoring.scorer import label_names  # noqa: E402
from freemask.scoring.train import SegmenterTrainer, TrainSpec  # noqa: E402
from freemask.shared.bus import ensure_topics  # noqa: E402
from freemask.shared.cli import start_services, stop_services  # noqa: E402
from freemask.shared.config import SERVICE_NAMES, FreemaskConfig, StackConfig, load_config  # noqa: E402
from freemask.shared.image_refs import ImageReader  # noqa: E402
from freemask.shared.stack import EmbeddedStack  # noqa: E402
from freemask.shared.store import ObjectStore  # noqa: E402
from freemask.v1 import coordinator_pb2, coordinator_pb2_grpc  # noqa: E402

RESULTS = HERE / "results"
SEED = 0


def services_run(config: FreemaskConfig, env: dict[str, str], log_dir: Path, overrides: dict[str, str]
                 ) -> tuple[float, int, dict[str, StageTotals]]:
    """(seconds of D'_0, samples scored, each stage's totals) with every service a process."""
    import grpc

    processes = start_services(config, env, log_dir)
    try:
        target = f"127.0.0.1:{config.server.ports['coordinator'].grpc_port}"
        with grpc.insecure_channel(target) as channel:
            coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
            coordinator.StartRun(coordinator_pb2.StartRunRequest(run_id="bench-services", seed=SEED,
                                                                 config_overrides=overrides), timeout=30)
            started = None
            while True:
                run = coordinator.GetRun(coordinator_pb2.GetRunRequest(run_id="bench-services"), timeout=30).run
                if started is None and run.rounds and run.rounds[0].requested:
                    started = time.perf_counter()
                if run.state in (coordinator_pb2.RUN_STATE_COMPLETED, coordinator_pb2.RUN_STATE_FAILED):
                    break
                time.sleep(0.1)
        elapsed = time.perf_counter() - started
        if run.state != coordinator_pb2.RUN_STATE_COMPLETED:
            raise RuntimeError(f"the services' run failed: {run.error}")
        return elapsed, run.rounds[0].scored, stage_totals(config)
    finally:
        stop_services(processes)


def in_process_run(config: FreemaskConfig, overrides: dict[str, str]) -> tuple[float, int]:
    """(seconds of D'_0, samples scored) with the machine and every stage handler in this process."""
    store = ObjectStore(config.store)
    trainer = SegmenterTrainer(config.scoring, label_names(config), SegmenterStore(store),
                               ImageReader(store, config.limits))
    platform = InProcessPlatform(config)
    started = None

    def train(machine: RunMachine, action: Train) -> None:
        nonlocal started
        trainer.run(TrainSpec(machine.record.run_id, action.round, action.pairs,
                              epochs=machine.record.settings.train_epochs or config.scoring.epochs, seed=SEED))
        started = time.perf_counter()  # D'_0's slots are published as soon as f_0 is in

    try:
        machine = platform.run("bench-in-process", SEED, overrides, train)
    finally:
        platform.close()
    elapsed = time.perf_counter() - started
    return elapsed, sum(slot.score is not None for slot in machine.record.rounds[0].slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=24, help="|D_0| and |D'_0|")
    parser.add_argument("--gap-wait-s", type=float, default=None,
                        help="bus.gap_wait_s for every service (0: consumers without bus.GapGuard); default: config's")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = {"rounds": "1", "initial_samples": str(args.samples), "samples_per_round": str(args.samples),
                 "train_epochs": "2"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = reserve_ports(17 + 2 * len(SERVICE_NAMES))[0]
        stack = EmbeddedStack(StackConfig(
            data_dir=Path(tmp) / "stack", s3_port=base, kafka_port=base + 1, triton_http_port=base + 2,
            triton_grpc_port=base + 3, triton_metrics_port=base + 4, seaweed_port_base=base + 5,
            model_repository=ROOT / "deploy" / "triton" / "models"))
        stack.up(progress=print)
        try:
            ports = {}
            for index, name in enumerate(SERVICE_NAMES):
                ports[f"FREEMASK_SERVER__PORTS__{name.upper()}__GRPC_PORT"] = str(base + 17 + 2 * index)
                ports[f"FREEMASK_SERVER__PORTS__{name.upper()}__METRICS_PORT"] = str(base + 18 + 2 * index)
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}, **stack.client_env(),
                   **ports, "FREEMASK_SCORING__INPUT_SIZE": "32"}
            if args.gap_wait_s is not None:
                env["FREEMASK_BUS__GAP_WAIT_S"] = str(args.gap_wait_s)
            config = load_config(environ=env)
            ensure_topics(config.bus)
            services_s, services_scored, stages = services_run(config, env, Path(tmp) / "logs", overrides)
            in_process_s, in_process_scored = in_process_run(config, overrides)
        finally:
            stack.down(progress=print)
    services_rate, in_process_rate = services_scored / services_s, in_process_scored / in_process_s
    commit = git_commit()
    result = {
        "samples_per_s_services": round(services_rate, 3),
        "samples_per_s_in_process": round(in_process_rate, 3),
        "bus_throughput_ratio": round(services_rate / in_process_rate, 3),
        "stage_seconds": {name: round(t.seconds / t.messages, 4) for name, t in stages.items() if t.messages},
        # Holes Tansu showed the stages' consumers, each held until written (bus.GapGuard), and any passed over
        "offset_gaps": {name: t.offset_gaps for name, t in stages.items()},
        "skipped_offsets": {name: t.skipped_offsets for name, t in stages.items()},
        "samples_scored": {"services": services_scored, "in_process": in_process_scored},
        "seconds": {"services": round(services_s, 1), "in_process": round(in_process_s, 1)},
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": commit or None,
        "seed": SEED,
        "config": {"run_overrides": overrides, "composed_fraction": config.coordinator.composed_fraction,
                   "max_poll_records": config.bus.max_poll_records, "gap_wait_s": config.bus.gap_wait_s,
                   "num_inference_steps": config.attention_mask.num_inference_steps, "scoring_input_size": 32,
                   "cpus": os.cpu_count()},
    }
    write_json(args.out, "pipeline.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
