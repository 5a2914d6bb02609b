"""The `freemask` command.

    freemask stack up|down|status|env   the embedded default stack (SeaweedFS, Tansu, tritonserver)
    freemask serve <service>            one service: gRPC + health + metrics + its stage worker
    freemask run                        the main job on the embedded stack (what `make run` does)
    freemask thesaurus build            count a caption corpus into a thesaurus index in the store
    freemask placement export|publish   FOPA as ONNX in a Triton model repository, on disk or in the store
    freemask scoring train|evaluate     train the segmenter f_t on a labelled manifest, or measure one
    freemask export                     a run's accepted samples as COCO, Pascal-VOC or a JSONL manifest
    freemask report                     a run as one HTML page: rounds, scores, mIoU, sample overlays
    freemask topics create              create the platform's topics that do not exist yet (Helm's topic Job)
    freemask health <service>           exit 0 if the service answers gRPC health SERVING (container HEALTHCHECK)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from freemask.shared.bus import ensure_topics
from freemask.shared.config import SERVICE_NAMES, ConfigError, FreemaskConfig, load_config
from freemask.shared.errors import InvalidInput, NotFound, Unavailable
from freemask.shared.grpc_runtime import TlsFileError, check_health
from freemask.shared.processes import ServerProcess, ServerStartError, start_server, stop_pid, tail
from freemask.shared.stack import EmbeddedStack, stack_for

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
                    if check_health(f"{host}:{config.server.ports[name].grpc_port}", timeout_s=0.5,
                                    server=config.server):
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


def _run_command(config: FreemaskConfig, config_path: Path | None, run_id: str | None, seed: int,
                 attach: bool, out: Path | None) -> int:
    """One coordinator run followed to its end, its exports and report written. Embedded (the
    default): the stack and every service are brought up first and taken down after. With
    `attach`: the run goes to the platform the config points at, which must be running."""
    from freemask.coordinator.job import RunFailed

    run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    try:
        if attach:
            return _follow_and_export(config, run_id, seed, out or Path("freemask-runs") / run_id)
        return _embedded_run(config, config_path, run_id, seed, out)
    except RunFailed as err:
        print(f"freemask: {err}", file=sys.stderr)
        return 1


def _embedded_run(config: FreemaskConfig, config_path: Path | None, run_id: str, seed: int, out: Path | None) -> int:
    from freemask.coordinator.job import REFERENCE_VALIDATION_SCENES
    from freemask.scoring.data import write_reference_split
    from freemask.shared.store import ObjectStore

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
        if run_config.coordinator.validation_manifest is None:
            store = ObjectStore(run_config.store)
            store.ensure_bucket()
            # the "real" labelled set each round's f_t is measured on when the config names none
            _, env["FREEMASK_COORDINATOR__VALIDATION_MANIFEST"] = write_reference_split(
                store, "val", run_config.coordinator.image_size, REFERENCE_VALIDATION_SCENES, progress_file=sys.stdout)
            run_config = load_config(config_path, environ=env)
        _print("== services")
        services = start_services(run_config, env, stack.data_dir / "logs")
        for name in SERVICE_NAMES:
            ports = run_config.server.ports[name]
            _print(f"{name:<15} grpc {run_config.server.host}:{ports.grpc_port}  metrics :{ports.metrics_port}/metrics")
        return _follow_and_export(run_config, run_id, seed, out or stack.data_dir / "exports" / run_id)
    finally:
        _print("== shutting down")
        stop_services(services)
        if started_stack:
            stack.down(progress=_print)


def _follow_and_export(config: FreemaskConfig, run_id: str, seed: int, out: Path) -> int:
    from freemask.coordinator.job import (
        RunFailed,
        export_accepted,
        follow_run,
        stage_lines,
        stage_totals,
        summary_lines,
    )
    from freemask.coordinator.report import write_report
    from freemask.shared.store import ObjectStore
    from freemask.v1 import coordinator_pb2

    _print(f"== run {run_id}: Algorithm 1 on the coordinator")
    status = follow_run(config, run_id, seed, {}, timeout_s=config.coordinator.run_timeout_s)
    for line in summary_lines(status):
        _print(line)
    stages = stage_totals(config)
    _print("== where the time went (Prometheus stage metrics)")
    for line in stage_lines(stages):
        _print(line)
    if status.state != coordinator_pb2.RUN_STATE_COMPLETED:
        raise RunFailed(f"run {run_id} did not complete")
    _print("== exports of the accepted samples")
    for line in export_accepted(config, run_id, out):
        _print(line)
    _print(f"report: {write_report(ObjectStore(config.store), config, run_id, out / 'report.html', stages=stages)}")
    return 0


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
    run = commands.add_parser("run", help="run the main job on the embedded stack")
    run.add_argument("--run-id", help="id of the coordinator run (default: run-{UTC time})")
    run.add_argument("--seed", type=int, default=0, help="seed of the whole run")
    run.add_argument("--attach", action="store_true",
                     help="run on the platform the config points at (already running) instead of the embedded one")
    run.add_argument("--out", type=Path,
                     help="where exports and report go (default: .stack/exports/{run}, or freemask-runs/{run} "
                          "with --attach)")
    thesaurus = commands.add_parser("thesaurus", help="thesaurus indexes in the store")
    thesaurus.add_argument("action", choices=("build",))
    thesaurus.add_argument("--corpus", default="reference",
                           help="'reference' (the reference world), a .txt/.jsonl[.gz] file, or s3://bucket/prefix/")
    thesaurus.add_argument("--captions", type=int, help="reference captions to draw (default: thesaurus config)")
    thesaurus.add_argument("--seed", type=int, help="seed of the reference captions (default: thesaurus config)")
    thesaurus.add_argument("--version", help="version to publish as (default: the index's content digest)")
    placement = commands.add_parser("placement", help="the FOPA placement model")
    placement_actions = placement.add_subparsers(dest="action", required=True)
    placement_export = placement_actions.add_parser("export", help="write fopa/ into a local model repository")
    placement_publish = placement_actions.add_parser(
        "publish", help="upload fopa/ under a store key prefix, for a Triton reading its repository from S3")
    # the choices are triton_repo.TARGETS, spelled out so that `--help` need not import torch
    targets = ("embedded", "embedded-gpu", "production")
    target_help = ("embedded: python backend, onnxruntime on CPU (the embedded stack); "
                   "embedded-gpu: python backend, torch on CUDA if there is one (the embedded server on a GPU host); "
                   "production: onnxruntime backend on GPU (the NGC Triton image)")
    placement_export.add_argument("--target", required=True, choices=targets, help=target_help)
    placement_export.add_argument("--out", type=Path, required=True, help="model repository to write fopa/ into")
    placement_publish.add_argument("--prefix", required=True,
                                   help="store key prefix of the repository (under store.prefix), e.g. "
                                        "triton/repository")
    placement_publish.add_argument("--target", default="production", choices=targets,
                                   help=f"{target_help} (default: production)")
    for action in (placement_export, placement_publish):
        action.add_argument("--weights", type=Path, help="FOPA weights directory (default: the shipped weights)")
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
    report = commands.add_parser("report", help="a coordinator run as one self-contained HTML page")
    report.add_argument("--run", required=True, help="run id")
    report.add_argument("--out", type=Path, required=True, help="HTML file to write")
    export = commands.add_parser("export", help="a coordinator run's accepted samples as files")
    export.add_argument("--run", required=True, help="run id")
    export.add_argument("--format", required=True, choices=("coco", "voc", "jsonl"))
    export.add_argument("--out", type=Path, required=True, help="directory to create (must not hold anything)")
    topics = commands.add_parser("topics", help="the platform's Kafka topics")
    topics.add_argument("action", choices=("create",))
    health = commands.add_parser("health", help="ask one service's gRPC health endpoint")
    health.add_argument("service", choices=SERVICE_NAMES)
    health.add_argument("--target", help="host:port to ask (default: 127.0.0.1 and the service's configured port)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    return parser


def _topics_command(config: FreemaskConfig) -> int:
    from freemask.shared.bus import Topics

    created = set(ensure_topics(config.bus))
    for topic in Topics.ALL:
        state = "created" if topic in created else "exists"
        _print(f"{topic:<30} {state:<8} partitions {config.bus.partitions_of(topic)}")
    return 0


def _health_command(config: FreemaskConfig, args: argparse.Namespace) -> int:
    # A container probe runs inside the service's own network namespace, so the
    # loopback address reaches a server bound to any interface.
    target = args.target or f"127.0.0.1:{config.server.ports[args.service].grpc_port}"
    try:
        serving = check_health(target, timeout_s=args.timeout, server=config.server)
    except TlsFileError as err:  # a probe that cannot read its certificate fails, saying why
        print(f"freemask: {err}", file=sys.stderr)
        return 1
    if serving:
        _print(f"{args.service} at {target}: SERVING")
        return 0
    print(f"freemask: {args.service} at {target} is not serving", file=sys.stderr)
    return 1


def _report_command(config: FreemaskConfig, args: argparse.Namespace) -> int:
    from freemask.coordinator.report import write_report
    from freemask.shared.store import ObjectStore

    _print(f"report of run {args.run}: {write_report(ObjectStore(config.store), config, args.run, args.out)}")
    return 0


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


def _placement_command(config: FreemaskConfig, args: argparse.Namespace) -> int:
    from freemask.placement.export import ExportMismatch
    from freemask.placement.model import DEFAULT_WEIGHTS_DIR, weights_version
    from freemask.placement.publish import publish_repository, repository_url
    from freemask.placement.triton_repo import write_repository
    from freemask.shared.store import ObjectStore

    weights = args.weights or DEFAULT_WEIGHTS_DIR
    described = f"fopa ({args.target}), weights {weights_version(weights)} from {weights}"
    try:
        if args.action == "export":
            _print(f"{described}: written to {write_repository(args.target, args.out, weights)}")
            return 0
        for key in publish_repository(ObjectStore(config.store), args.prefix, args.target, weights):
            _print(f"uploaded {key}")
    except ExportMismatch as err:
        print(f"freemask: {err}; the repository was left as it was", file=sys.stderr)
        return 1
    _print(f"{described}: serve it with tritonserver --model-repository={repository_url(config.store, args.prefix)}")
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
            return _placement_command(config, args)
        if args.command == "scoring":
            return _scoring_command(config, args)
        if args.command == "export":
            return _export_command(config, args)
        if args.command == "report":
            return _report_command(config, args)
        if args.command == "topics":
            return _topics_command(config)
        if args.command == "health":
            return _health_command(config, args)
        if args.command == "serve":
            from freemask.shared.runner import serve

            return serve(args.service, config)
        return _run_command(config, args.config, args.run_id, args.seed, args.attach, args.out)
    except (ServerStartError, InvalidInput, NotFound, Unavailable) as err:
        print(f"freemask: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
