"""The `freemask` command.

    freemask stack up|down|status|env   the embedded default stack (SeaweedFS, Tansu, tritonserver)
    freemask serve <service>            one service: gRPC + health + metrics + its stage worker
    freemask run                        the main job on the embedded stack (what `make run` does)
    freemask thesaurus build            count a caption corpus into a thesaurus index in the store
    freemask placement export           FOPA as ONNX in a Triton model repository (embedded or production)
    freemask scoring train|evaluate     train the segmenter f_t on a labelled manifest, or measure one
    freemask export                     a run's accepted samples as COCO, Pascal-VOC or a JSONL manifest
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from google.protobuf.message import Message
from tqdm import tqdm

from freemask.shared.bus import OutboundMessage, Publisher, Topics, ensure_topics, make_consumer, make_producer
from freemask.shared.config import SERVICE_NAMES, ConfigError, FreemaskConfig, load_config
from freemask.shared.errors import InvalidInput, NotFound, Unavailable
from freemask.shared.grpc_runtime import check_health
from freemask.shared.keys import derive_sample_id
from freemask.shared.processes import ServerProcess, ServerStartError, start_server, stop_pid, tail
from freemask.shared.stack import EmbeddedStack, stack_for
from freemask.v1 import compose_pb2, dead_letter_pb2, generate_pb2, samples_pb2

_SERVICE_START_TIMEOUT_S = 60.0


def _print(message: str) -> None:
    print(message, flush=True)


def _stack_command(stack: EmbeddedStack, action: str) -> int:
    if action == "up":
        stack.up(progress=_print)
        _print("point clients at it with:  eval \"$(freemask stack env)\"")
    elif action == "down":
        stack.down(progress=_print)
    elif action == "status":
        parts = stack.status()
        for part in parts:
            state = f"running (pid {part.pid})" if part.running else "stopped"
            _print(f"{part.name:<13} {state:<22} {part.endpoint}")
        return 0 if all(part.running for part in parts) else 3
    elif action == "env":
        for name, value in stack.client_env().items():
            _print(f"export {name}={value}")
    return 0


def start_services(
    config: FreemaskConfig, env: dict[str, str], log_dir: Path, names: Sequence[str] = SERVICE_NAMES
) -> list[ServerProcess]:
    """Start each service as its own process and wait until every one answers health."""
    processes: list[ServerProcess] = []
    try:
        for name in names:
            command = [sys.executable, "-m", "freemask.shared.cli", "serve", name]
            processes.append(start_server(name, command, log_dir / f"{name}.log", env=env))
        host = config.server.host
        with tqdm(total=len(names), desc="services healthy", unit="svc") as bar:
            pending = dict(zip(names, processes, strict=True))
            deadline = time.monotonic() + _SERVICE_START_TIMEOUT_S
            while pending:
                for name, process in list(pending.items()):
                    if not process.alive():
                        raise ServerStartError(f"service {name} exited during start-up\n{tail(process.log_path)}")
                    if check_health(f"{host}:{config.server.ports[name].grpc_port}", timeout_s=0.5):
                        del pending[name]
                        bar.update(1)
                if pending and time.monotonic() > deadline:
                    raise ServerStartError(
                        f"services not healthy after {_SERVICE_START_TIMEOUT_S:.0f} s: {sorted(pending)}"
                    )
                time.sleep(0.2)
    except BaseException:
        stop_services(processes)
        raise
    return processes


def stop_services(processes: Sequence[ServerProcess]) -> None:
    for process in processes:
        stop_pid(process.pid, timeout_s=30.0)


def _run_command(config: FreemaskConfig, config_path: Path | None) -> int:
    stack = stack_for(config)
    started_stack = not all(part.running for part in stack.status())
    _print("== embedded stack")
    stack.up(progress=_print)
    services: list[ServerProcess] = []
    try:
        env = {**os.environ, **stack.client_env()}
        if config_path is not None:
            env["FREEMASK_CONFIG"] = str(config_path.resolve())  # the services read the same file
        run_config = load_config(config_path, environ=env)
        ensure_topics(run_config.bus)
        _print("== services")
        services = start_services(run_config, env, stack.data_dir / "logs")
        for name in SERVICE_NAMES:
            ports = run_config.server.ports[name]
            _print(f"{name:<15} grpc {run_config.server.host}:{ports.grpc_port}  metrics :{ports.metrics_port}/metrics")
        _print("== main job")
        singles = _generate_singles(run_config, run_id="make-run")
        _train_segmenter(run_config, singles)
        compose_started_ms = int(time.time() * 1000)
        composed = _compose(run_config, singles)
        _score(run_config, composed, since_ms=compose_started_ms)
        _print("stage 1 (attention masks), stage 2 (thesaurus, FOPA placement, RAIN harmonization) and scoring ran")
        _print("end to end over the bus; the coordinator's rounds (Coordinator.StartRun) are not driven from here yet.")
    finally:
        _print("== shutting down")
        stop_services(services)
        if started_stack:
            stack.down(progress=_print)
    return 0


class StageIncomplete(RuntimeError):
    """The main job's outputs did not all arrive."""


def _publish(config: FreemaskConfig, topic: str, requests: Mapping[str, Message]) -> int:
    """Publish `requests` keyed by sample id; return the publish time in ms (see `_await`)."""
    published_ms = int(time.time() * 1000)
    publisher = Publisher(make_producer(config.bus))
    try:
        publisher.publish([OutboundMessage(topic, key, request) for key, request in requests.items()])
    finally:
        publisher.close()
    return published_ms


def _await(config: FreemaskConfig, results: Mapping[str, type[Message]], keys: Collection[str], what: str,
           since_ms: int, timeout_s: float) -> dict[str, Message]:
    """The first record per key on any of the `results` topics (topic -> message type), written
    at or after `since_ms`; StageIncomplete naming the keys that got none in time.

    Ids are deterministic, so results of an earlier `make run` carry the same keys: only
    records written after this run's publish count.
    """
    consumer = make_consumer(config.bus, f"make-run-{uuid.uuid4().hex[:8]}", list(results))
    done: dict[str, Message] = {}
    deadline = time.monotonic() + timeout_s
    try:
        with tqdm(total=len(keys), desc=what, unit="msg", file=sys.stdout) as bar:
            while len(done) < len(keys) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        key = record.key.decode() if record.key else ""
                        if key in keys and key not in done and record.timestamp >= since_ms:
                            done[key] = results[record.topic].FromString(record.value)
                            bar.update(1)
    finally:
        consumer.close(autocommit=False)
    missing = sorted(set(keys) - set(done))
    if missing:
        raise StageIncomplete(f"{len(missing)} of {len(keys)} {what} did not arrive within {timeout_s:.0f} s "
                              f"(see the service logs): {', '.join(missing)}")
    return done


def _dead_letter_line(letter: dead_letter_pb2.DeadLetter) -> str:
    return f"dead-lettered by {letter.stage or 'a stage'}: {letter.error}"


def _generate_singles(config: FreemaskConfig, run_id: str, timeout_s: float = 600.0
                      ) -> list[generate_pb2.SingleObject]:
    """Stage 1: one GenerateRequest per configured class; each ends as a SingleObject or a dead letter."""
    from freemask.world import DRAWABLE_CLASSES, allowed_backgrounds  # the world's plausibility rules

    requests = {}
    for index, cls in enumerate(config.world.classes):
        background = allowed_backgrounds(cls)[0] if cls in DRAWABLE_CLASSES else config.world.backgrounds[0]
        request = generate_pb2.GenerateRequest(
            run_id=run_id, round=0, sample_id=derive_sample_id(run_id, 0, index), class_name=cls,
            background_name=background, seed=index,
            prompt=config.world.prompt_templates[0].format(cls=cls, background=background))
        requests[request.sample_id] = request
    published_ms = _publish(config, Topics.GENERATE, requests)
    outcomes = _await(config, {Topics.SINGLES: generate_pb2.SingleObject, Topics.DLQ: dead_letter_pb2.DeadLetter},
                      requests.keys(), "single objects", published_ms, timeout_s)
    singles = []
    for key, request in requests.items():
        outcome = outcomes[key]
        if isinstance(outcome, generate_pb2.SingleObject):
            singles.append(outcome)
            _print(f"{outcome.class_name:<10} mask {outcome.mask_area_pixels:>4} px  tau {outcome.threshold:.2f}  "
                   f"{outcome.keys.label_key}")
        else:
            _print(f"{request.class_name:<10} {_dead_letter_line(outcome)}")
    if not singles:
        raise StageIncomplete("no single object was generated: every request was dead-lettered")
    return singles


def _train_segmenter(config: FreemaskConfig, singles: Sequence[generate_pb2.SingleObject],
                     timeout_s: float = 600.0) -> None:
    """f_0 of the active-learning loop, trained by the scoring service on the single objects (D_0)."""
    import grpc

    from freemask.v1 import scoring_pb2, scoring_pb2_grpc

    run_id, round_index = singles[0].run_id, singles[0].round
    images = [scoring_pb2.LabelledImage(image_key=s.keys.image_key, label_key=s.keys.label_key) for s in singles]
    target = f"{config.server.host}:{config.server.ports['scoring'].grpc_port}"
    with grpc.insecure_channel(target) as channel:
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        job = scoring.Train(scoring_pb2.TrainRequest(
            run_id=run_id, round=round_index, seed=0,
            dataset=scoring_pb2.Dataset(images=scoring_pb2.LabelledImageList(images=images))), timeout=30)
        deadline = time.monotonic() + timeout_s
        with tqdm(desc=f"training segmenter {run_id}/{round_index} on {len(images)} single objects", unit="epoch",
                  file=sys.stdout) as bar:
            while True:
                status = scoring.TrainStatus(scoring_pb2.TrainStatusRequest(job_id=job.job_id), timeout=30)
                bar.total = status.total_epochs
                bar.update(status.epoch - bar.n)
                if status.state == scoring_pb2.TRAIN_STATE_SUCCEEDED:
                    break
                if status.state == scoring_pb2.TRAIN_STATE_FAILED:
                    raise StageIncomplete(f"segmenter training failed: {status.error}")
                if time.monotonic() > deadline:
                    raise StageIncomplete(f"segmenter training did not finish within {timeout_s:.0f} s")
                time.sleep(0.5)
    _print(f"segmenter {status.model.version}: {status.step} steps, loss {status.loss:.3f}, "
           f"{status.skipped_images} images skipped")


def _score(config: FreemaskConfig, composed: Sequence[samples_pb2.Sample], since_ms: int,
           timeout_s: float = 300.0) -> None:
    """The scoring stage's S(x) for every composed sample, lowest first: the likeliest wrong labels.
    Scoring starts as each sample is composed, so results count from the compose publish on."""
    outcomes = _await(config, {Topics.SCORED: samples_pb2.ScoredSample, Topics.DLQ: dead_letter_pb2.DeadLetter},
                      [s.sample_id for s in composed], "scored samples", since_ms, timeout_s)
    scored = sorted((o for o in outcomes.values() if isinstance(o, samples_pb2.ScoredSample)), key=lambda s: s.score)
    for item in scored:
        classes = ", ".join(f"{name} {iou:.2f}" for name, iou in sorted(item.class_iou.items()))
        _print(f"S(x) {item.score:.3f}  {item.sample.sample_id}  by segmenter {item.segmenter.version}  ({classes})")
    for key, outcome in outcomes.items():
        if isinstance(outcome, dead_letter_pb2.DeadLetter):
            _print(f"{key} {_dead_letter_line(outcome)}")
    _print(f"{len(scored)} of {len(composed)} composed samples scored")


def _compose(config: FreemaskConfig, singles: Sequence[generate_pb2.SingleObject], objects_to_add: int = 2,
             timeout_s: float = 300.0) -> list[samples_pb2.Sample]:
    """Stage 2: each single object as a base scene; the thesaurus plans what to add, placement
    chooses where each object goes and harmonization pastes it, until the scene is composed.

    A composition can end in the DLQ by design (e.g. no room for an object within
    `placement.max_overlap`); that is reported, and the job fails only if none is composed.
    """
    requests = {}
    for index, single in enumerate(singles):
        sample_id = derive_sample_id(single.run_id, single.round, index, kind="c")
        requests[sample_id] = compose_pb2.ComposeRequest(
            run_id=single.run_id, round=single.round, sample_id=sample_id, base_scene=single,
            background_name=single.background_name, num_objects_to_add=objects_to_add, seed=index)
    published_ms = _publish(config, Topics.COMPOSE, requests)
    outcomes = _await(config, {Topics.COMPOSED: samples_pb2.Sample, Topics.DLQ: dead_letter_pb2.DeadLetter},
                      requests.keys(), "composed samples", published_ms, timeout_s)
    for key, request in requests.items():
        outcome = outcomes[key]
        _print(f"{request.base_scene.class_name:<10} on {request.background_name}")
        if isinstance(outcome, dead_letter_pb2.DeadLetter):
            _print(f"{'':<10}    {_dead_letter_line(outcome)}")
            continue
        for obj in outcome.objects:
            box = obj.box
            _print(f"{'':<10}    {obj.class_name:<10} at x={box.x} y={box.y} {box.width}x{box.height} px, "
                   f"{obj.visible_area_pixels} px visible, FOPA score {obj.placement_score:.2f}")
        _print(f"{'':<10}    {outcome.keys.image_key}")
    composed = [outcome for outcome in outcomes.values() if isinstance(outcome, samples_pb2.Sample)]
    _print(f"{len(composed)} of {len(requests)} scenes composed; the others are in {Topics.DLQ} with their reason")
    if not composed:
        raise StageIncomplete("no scene was composed: every composition was dead-lettered")
    return composed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freemask", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="YAML config (default: $FREEMASK_CONFIG, then packaged defaults)")
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("stack", help="manage the embedded default stack")
    stack.add_argument("action", choices=("up", "down", "status", "env"))
    serve = commands.add_parser("serve", help="run one service until SIGTERM")
    serve.add_argument("service", choices=SERVICE_NAMES)
    commands.add_parser("run", help="run the main job on the embedded stack")
    thesaurus = commands.add_parser("thesaurus", help="thesaurus indexes in the store")
    thesaurus.add_argument("action", choices=("build",))
    thesaurus.add_argument("--corpus", default="reference",
                           help="'reference' (the reference world), a .txt/.jsonl[.gz] file, or s3://bucket/prefix/")
    thesaurus.add_argument("--captions", type=int, help="reference captions to draw (default: thesaurus config)")
    thesaurus.add_argument("--seed", type=int, help="seed of the reference captions (default: thesaurus config)")
    thesaurus.add_argument("--version", help="version to publish as (default: the index's content digest)")
    placement = commands.add_parser("placement", help="the FOPA placement model")
    placement.add_argument("action", choices=("export",))
    # the choices are triton_repo.TARGETS, spelled out so that `--help` need not import torch
    placement.add_argument("--target", required=True, choices=("embedded", "production"),
                           help="embedded: python backend on CPU (the embedded stack); "
                                "production: onnxruntime backend on GPU (the NGC Triton image)")
    placement.add_argument("--out", type=Path, required=True, help="model repository to write fopa/ into")
    placement.add_argument("--weights", type=Path, help="FOPA weights directory (default: the shipped weights)")
    scoring = commands.add_parser("scoring", help="the segmenter of the active-learning loop")
    scoring.add_argument("action", choices=("train", "evaluate"))
    scoring.add_argument("--manifest", required=True,
                         help="store key of a JSONL manifest of {image_key, label_key} pairs")
    scoring.add_argument("--run", help="train: run id of the model (weights under models/segmenter/{run}/{round}/)")
    scoring.add_argument("--round", type=int, default=0, help="train: round t of f_t (default 0)")
    scoring.add_argument("--epochs", type=int, help="train: passes over the data (default: scoring config)")
    scoring.add_argument("--seed", type=int, default=0, help="train: seed of initialisation and augmentation")
    scoring.add_argument("--init-from", help="train: segmenter version '{run}/{round}' to start from")
    scoring.add_argument("--model", help="evaluate: segmenter version '{run}/{round}'")
    export = commands.add_parser("export", help="a coordinator run's accepted samples as files")
    export.add_argument("--run", required=True, help="run id")
    export.add_argument("--format", required=True, choices=("coco", "voc", "jsonl"))
    export.add_argument("--out", type=Path, required=True, help="directory to create (must not hold anything)")
    return parser


def _export_command(config: FreemaskConfig, args: argparse.Namespace) -> int:
    from freemask.coordinator.exports import ExportMismatch, export_run
    from freemask.shared.store import ObjectStore

    try:
        summary = export_run(ObjectStore(config.store), config, args.run, args.format, args.out)
    except ExportMismatch as err:
        print(f"freemask: the export failed its check and was not written: {err}", file=sys.stderr)
        return 1
    _print(f"run {args.run}: {summary.samples} samples, {summary.annotations} objects as {args.format} in "
           f"{summary.out_dir}")
    return 0


def _scoring_command(config: FreemaskConfig, args: argparse.Namespace) -> int:
    """Training in this process, with a progress bar; SIGTERM or Ctrl-C checkpoints and stops."""
    import signal
    import threading

    from freemask.scoring.cli import evaluate_manifest, train_manifest
    from freemask.scoring.train import TrainingStopped

    if args.action == "evaluate":
        if not args.model:
            raise InvalidInput("evaluate needs --model {run}/{round}")
        result = evaluate_manifest(config, args.manifest, args.model)
        _print(f"segmenter {args.model}: mIoU {result.mean_iou:.4f} over {result.num_images} images "
               f"({result.skipped_images} skipped)")
        for name, iou in sorted(result.class_iou.items()):
            _print(f"  {name:<12} {iou:.4f}")
        return 0
    if not args.run:
        raise InvalidInput("train needs --run")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with tqdm(desc="training", unit="step", dynamic_ncols=True) as bar:
        def report(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}")

        try:
            version, progress = train_manifest(config, args.manifest, args.run, args.round, args.epochs, args.seed,
                                               args.init_from, report, stopping.is_set)
        except TrainingStopped as err:
            print(f"freemask: training {err}; the same command resumes from the checkpoint", file=sys.stderr)
            return 1
    resumed = f", resumed at step {progress.resumed_from_step}" if progress.resumed_from_step else ""
    _print(f"segmenter {version.version}: {progress.step} steps, loss {progress.loss:.4f}, {progress.images} images "
           f"({progress.skipped_images} skipped){resumed}; weights under models/segmenter/{version.version}/")
    return 0


def _thesaurus_command(config: FreemaskConfig, args: argparse.Namespace) -> int:
    from freemask.shared.store import ObjectStore
    from freemask.thesaurus.corpus import open_corpus
    from freemask.thesaurus.service import IndexRepository, build_and_publish, index_key

    corpus = open_corpus(args.corpus, config, count=args.captions, seed=args.seed)
    repository = IndexRepository(ObjectStore(config.store))
    version, index = build_and_publish(config, repository, corpus, args.version, progress=True)
    _print(f"thesaurus {version}: {index.captions} captions, {sum(index.background_counts.values())} naming a "
           f"background; stored at {index_key(version)}")
    _print(f"serve it with FREEMASK_THESAURUS__VERSION={version}")
    return 0


def _placement_command(args: argparse.Namespace) -> int:
    from freemask.placement.export import ExportMismatch
    from freemask.placement.model import DEFAULT_WEIGHTS_DIR, weights_version
    from freemask.placement.triton_repo import write_repository

    weights = args.weights or DEFAULT_WEIGHTS_DIR
    try:
        model_dir = write_repository(args.target, args.out, weights)
    except ExportMismatch as err:
        print(f"freemask: {err}; the repository was left as it was", file=sys.stderr)
        return 1
    _print(f"fopa ({args.target}) written to {model_dir}, weights {weights_version(weights)} from {weights}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"freemask: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "stack":
            return _stack_command(stack_for(config), args.action)
        if args.command == "thesaurus":
            return _thesaurus_command(config, args)
        if args.command == "placement":
            return _placement_command(args)
        if args.command == "scoring":
            return _scoring_command(config, args)
        if args.command == "export":
            return _export_command(config, args)
        if args.command == "serve":
            from freemask.shared.runner import serve

            return serve(args.service, config)
        return _run_command(config, args.config)
    except (ServerStartError, StageIncomplete, InvalidInput, NotFound, Unavailable) as err:
        print(f"freemask: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
