"""Platform benchmark: the embedded bus and store, measured side by side in one run.

    make bench            (or: .venv/bin/python tests/benchmarks/bench_platform.py)

Starts a private embedded stack (SeaweedFS + Tansu) on free loopback ports,
measures, stops it, and writes tests/benchmarks/results/platform.json and
platform.md. Figures are medians of repeated trials; the machine is noisy, so
compare ratios from one run rather than absolute numbers across runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from bus_helpers import drain, produce, unique_topics  # noqa: E402
from ports import reserve_ports  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402

from freemask.shared.bus import InboundMessage, OutboundMessage, StageWorker, make_consumer  # noqa: E402
from freemask.shared.config import BusConfig, StackConfig  # noqa: E402
from freemask.shared.metrics import ServiceMetrics  # noqa: E402
from freemask.shared.stack import EmbeddedStack  # noqa: E402
from freemask.shared.store import ObjectStore  # noqa: E402
from freemask.v1 import generate_pb2  # noqa: E402

RESULTS = HERE / "results"
TRIALS = 3
# messages per trial by batch size: batch 1 is slow, so it gets fewer
STAGE_MESSAGES = {1: 500, 16: 3000, 256: 5000}
OBJECT_BYTES = 1024 * 1024
OBJECTS = 50


def first_message_latency_s(config: BusConfig) -> float:
    (topic,) = unique_topics(config, "join")
    produce(config, topic, ["s-0"])
    started = time.monotonic()
    consumer = make_consumer(config, f"join-{uuid.uuid4().hex[:8]}", [topic])
    try:
        while not consumer.poll(timeout_ms=100):
            if time.monotonic() - started > 120:
                raise TimeoutError("no message in 120 s")
        return time.monotonic() - started
    finally:
        consumer.close()


def stage_messages_per_s(config: BusConfig, batch: int) -> float:
    config = config.model_copy(update={"max_poll_records": batch})
    count = STAGE_MESSAGES[batch]
    source, sink = unique_topics(config, "in", "out")
    produce(config, source, [f"s-{i}" for i in range(count)])

    def copy(message: InboundMessage) -> list[OutboundMessage]:
        request = message.decode(generate_pb2.GenerateRequest)
        return [OutboundMessage(sink, request.sample_id, request)]

    worker = StageWorker(f"bench-{source}", source, copy, config, ServiceMetrics("bench"))
    started = time.monotonic()
    stats = worker.run(max_messages=count, timeout_s=600)
    elapsed = time.monotonic() - started
    assert stats.processed == count
    assert len(drain(config, sink, count)) == count
    return count / elapsed


def store_mb_per_s(store: ObjectStore) -> tuple[float, float]:
    payload = os.urandom(OBJECT_BYTES)
    run = uuid.uuid4().hex[:8]
    started = time.monotonic()
    for i in range(OBJECTS):
        store.put_bytes(f"runs/bench-{run}/objects/{i}.bin", payload)
    put_s = time.monotonic() - started
    started = time.monotonic()
    for i in range(OBJECTS):
        assert len(store.get_bytes(f"runs/bench-{run}/objects/{i}.bin")) == OBJECT_BYTES
    get_s = time.monotonic() - started
    megabytes = OBJECTS * OBJECT_BYTES / 1e6
    return megabytes / put_s, megabytes / get_s


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        base = reserve_ports(17)[0]
        stack = EmbeddedStack(StackConfig(data_dir=Path(tmp), s3_port=base, kafka_port=base + 1,
                                          seaweed_port_base=base + 5))
        stack.up(("seaweedfs", "tansu"), progress=print)
        try:
            tuned = BusConfig(bootstrap_servers=stack.kafka_bootstrap)
            default_session = tuned.model_copy(update={"session_timeout_ms": 45000, "heartbeat_interval_ms": 3000})
            join_tuned = statistics.median(first_message_latency_s(tuned) for _ in range(TRIALS))
            join_default = first_message_latency_s(default_session)  # one trial: it takes ~half a minute
            per_batch = {batch: statistics.median(stage_messages_per_s(tuned, batch) for _ in range(TRIALS))
                         for batch in (1, 16, 256)}
            put_mb_s, get_mb_s = zip(*(store_mb_per_s(ObjectStore(stack.store_config())) for _ in range(TRIALS)))
        finally:
            stack.down(progress=print)

    results = {
        "first_message_s": {
            f"session_{tuned.session_timeout_ms}ms": round(join_tuned, 2),
            "session_45000ms_kafka_python_default": round(join_default, 2),
        },
        "stage_messages_per_s": {str(batch): round(rate, 1) for batch, rate in per_batch.items()},
        "stage_batch_gain_256_vs_1": round(per_batch[256] / per_batch[1], 1),
        "store_mb_per_s": {"put_1mb": round(statistics.median(put_mb_s), 1),
                           "get_1mb": round(statistics.median(get_mb_s), 1)},
        "commit": git_commit(),
        "config": {"trials": TRIALS, "stage_messages": {str(b): n for b, n in STAGE_MESSAGES.items()},
                   "object_bytes": OBJECT_BYTES, "objects": OBJECTS,
                   "broker": "tansu 0.6 (s3:// storage on SeaweedFS)", "store": "seaweedfs weed mini"},
        "seed": None,
        "bench_seconds": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    results["config"]["session_timeout_ms"] = tuned.session_timeout_ms
    write_json(RESULTS, "platform.json", results)
    lines = [
        "# Platform benchmark (`make bench`)", "",
        f"commit `{(results['commit'] or 'unknown')[:12]}`, {os.cpu_count()} CPUs, medians of {TRIALS} trials", "",
        "| measure | value |", "|---|---|",
        f"| first message after subscribing, session {tuned.session_timeout_ms} ms (ours) | {join_tuned:.2f} s |",
        f"| first message after subscribing, kafka-python default 45 s session | {join_default:.2f} s |",
        *(f"| stage throughput, batch {b} (poll → handle → publish → commit) | {r:.0f} msg/s |"
          for b, r in per_batch.items()),
        f"| batch 256 ÷ batch 1 | {results['stage_batch_gain_256_vs_1']}× |",
        f"| store put, 1 MiB objects | {results['store_mb_per_s']['put_1mb']} MB/s |",
        f"| store get, 1 MiB objects | {results['store_mb_per_s']['get_1mb']} MB/s |",
    ]
    (RESULTS / "platform.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
