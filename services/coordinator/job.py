"""The main job as a user runs it (`freemask run`): start a run on the coordinator, follow its
rounds with progress bars, print what each round kept, and export the accepted samples."""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from freemask.coordinator.exports import export_run
from freemask.shared.config import FreemaskConfig
from freemask.shared.grpc_runtime import error_from_rpc, open_channel
from freemask.shared.store import ObjectStore
from freemask.v1 import coordinator_pb2, coordinator_pb2_grpc

EXPORT_FORMATS = ("coco", "voc", "jsonl")
REFERENCE_VALIDATION_SCENES = 200
_ENDED = (coordinator_pb2.RUN_STATE_COMPLETED, coordinator_pb2.RUN_STATE_STOPPED, coordinator_pb2.RUN_STATE_FAILED)


class RunFailed(RuntimeError):
    """The run ended FAILED, or did not end in time."""


# The services whose stage workers a run passes through, in pipeline order.
STAGE_SERVICES = ("attention_mask", "thesaurus", "placement", "harmonization", "scoring")


@dataclass(frozen=True)
class StageTotals:
    messages: int  # handled successfully
    seconds: float  # spent handling messages (outputs included)
    offset_gaps: int = 0  # polls held back at an offset the broker had not yet written (bus.GapGuard)
    skipped_offsets: int = 0  # offsets passed over after bus.gap_wait_s


def stage_totals(config: FreemaskConfig) -> dict[str, StageTotals]:
    """Each stage's work so far, read from its service's Prometheus endpoint (a service that does
    not answer is left out)."""
    totals = {}
    for name in STAGE_SERVICES:
        url = f"http://{config.server.host}:{config.server.ports[name].metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own loopback endpoint
                text = response.read().decode("utf-8")
        except OSError:
            continue
        messages, seconds, gaps, skipped = 0.0, 0.0, 0.0, 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "freemask_stage_messages_total" and sample.labels.get("outcome") == "ok":
                    messages += sample.value
                elif sample.name == "freemask_stage_processing_seconds_sum":
                    seconds += sample.value
                elif sample.name == "freemask_bus_offset_gaps_total":
                    gaps += sample.value
                elif sample.name == "freemask_bus_skipped_offsets_total":
                    skipped += sample.value
        totals[name] = StageTotals(int(messages), seconds, int(gaps), int(skipped))
    return totals


def follow_run(config: FreemaskConfig, run_id: str, seed: int, overrides: Mapping[str, str],
               timeout_s: float) -> coordinator_pb2.RunStatus:
    """StartRun, then one progress bar per round (samples scored or dead-lettered) until the run ends."""
    target = f"{config.server.host}:{config.server.ports['coordinator'].grpc_port}"
    with open_channel(target, config.server) as channel:
        coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
        coordinator.StartRun(coordinator_pb2.StartRunRequest(run_id=run_id, seed=seed,
                                                             config_overrides=dict(overrides)), timeout=30)
        bootstrap = tqdm(desc="D_0: generating single objects", bar_format="{desc} {elapsed}", file=sys.stdout)
        stages = {name: tqdm(desc=f"{name:<15} messages handled", unit="msg", file=sys.stdout)
                  for name in STAGE_SERVICES}
        bars: dict[int, tqdm] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                status = coordinator.GetRun(coordinator_pb2.GetRunRequest(run_id=run_id), timeout=30).run
                for name, totals in stage_totals(config).items():
                    stages[name].update(totals.messages - stages[name].n)
                if status.rounds:
                    bootstrap.close()  # D_0 is in: closing twice is a no-op
                else:
                    bootstrap.refresh()  # keeps its clock running while D_0 is generated
                for item in status.rounds:
                    bar = bars.get(item.round)
                    if bar is None:
                        bar = bars[item.round] = tqdm(desc=f"round {item.round}: scored or dead-lettered",
                                                      unit="sample", file=sys.stdout)
                    bar.total = item.requested or None
                    bar.update(item.scored + item.dead_lettered - bar.n)
                if status.state in _ENDED:
                    return status
                if time.monotonic() > deadline:
                    raise RunFailed(f"run {run_id} did not end within {timeout_s:.0f} s (state "
                                    f"{coordinator_pb2.RunState.Name(status.state)})")
                time.sleep(1.0)
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"coordinator at {target}") from None
        finally:
            for bar in (bootstrap, *stages.values(), *bars.values()):
                bar.close()


def stage_lines(totals: Mapping[str, StageTotals]) -> list[str]:
    lines = []
    for name, t in totals.items():
        work = f"{t.messages} messages, {t.seconds / t.messages:.3f} s each" if t.messages else "no messages"
        line = f"{name:<15} {work}"
        if t.offset_gaps or t.skipped_offsets:  # the broker served past unwritten records (bus.GapGuard)
            line += f"; waited at {t.offset_gaps} unwritten offsets, passed over {t.skipped_offsets}"
        lines.append(line)
    return lines


def summary_lines(status: coordinator_pb2.RunStatus) -> list[str]:
    lines = [f"run {status.run_id}: {coordinator_pb2.RunState.Name(status.state).removeprefix('RUN_STATE_').lower()}"
             f", {len(status.rounds)} of {status.total_rounds} rounds"]
    for item in status.rounds:
        measured = f" (validation mIoU {item.validation_mean_iou:.3f})" if item.validation_mean_iou else ""
        cuts = item.class_score_thresholds
        cut = (f"the top of each of {len(cuts)} groups, S(x) >= {min(cuts.values()):.3f} to {max(cuts.values()):.3f}"
               if cuts else f"S(x) >= {item.score_threshold:.3f}")
        lines.append(f"round {item.round}: {item.requested} requested, {item.scored} scored, {item.dead_lettered} "
                     f"dead-lettered, {item.retained} kept at {cut}, segmenter {item.segmenter.version}{measured}")
    if status.error:
        lines.append(f"error: {status.error}")
    return lines


def export_accepted(config: FreemaskConfig, run_id: str, out_dir: Path) -> list[str]:
    """Every export format of the run's accepted samples under `out_dir/{format}/`."""
    store = ObjectStore(config.store)
    lines = []
    for fmt in EXPORT_FORMATS:
        summary = export_run(store, config, run_id, fmt, out_dir / fmt)
        lines.append(f"{fmt:<6} {summary.samples} samples, {summary.annotations} objects: {summary.out_dir}")
    return lines
