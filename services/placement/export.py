"""FOPA as files that Triton serves (DESIGN §3, the tritonserver row).

- ONNX (`export_onnx`): what the embedded and production targets serve;
- a `torch.export` program (`export_program`): what the embedded-gpu target runs with
  torch on the GPU, since the wheel's server has no onnxruntime backend and the CPU
  onnxruntime the python backend uses cannot reach a GPU.

Both are `FopaHeatmap` (sigmoid heatmaps) with a dynamic batch axis. Every export
is checked against torch before it is published: a graph that exports cleanly but
computes something else must never reach a server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from freemask.placement.geometry import BACKGROUND_SIDE, FOREGROUND_SIDE
from freemask.placement.model import FopaHeatmap, FopaNet, load_fopa

# Pinned so that a torch upgrade cannot silently raise the opset past what the
# production Triton image's onnxruntime runs.
OPSET_VERSION = 18
INPUT_NAMES = ("BACKGROUND", "FOREGROUND")
OUTPUT_NAME = "HEATMAP"
# Far above Triton's max_batch_size: the server, not the graph, bounds the batch.
MAX_EXPORT_BATCH = 1024
# Largest |onnx - torch| accepted on the [0, 1] heatmaps.
TOLERANCE = 1e-4
# Batch sizes the check runs: 1 and an odd size other than the tracing example's.
VERIFY_BATCHES = (1, 5)
_EXAMPLE_BATCH = 2  # not 1: torch.export would specialise a batch of 1 to a constant


class ExportMismatch(RuntimeError):
    """The exported ONNX graph does not compute what the torch model computes."""


def _fopa_inputs(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    background = torch.rand(batch, 3, BACKGROUND_SIDE, BACKGROUND_SIDE, generator=generator) * 2 - 1
    foreground = torch.rand(batch, 4, FOREGROUND_SIDE, FOREGROUND_SIDE, generator=generator) * 2 - 1
    return background, foreground


def _check_against_torch(model: FopaHeatmap, run: Callable[[np.ndarray, np.ndarray], np.ndarray], what: str,
                         batches: tuple[int, ...]) -> float:
    """Compare `run(background, foreground)` with `model` on random batches; return the largest difference.

    Raises ExportMismatch if any batch fails to run, has the wrong shape or differs by more than TOLERANCE.
    """
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in batches:
        background, foreground = _fopa_inputs(batch, generator)
        with torch.no_grad():
            expected = model(background, foreground).numpy()
        try:
            actual = run(background.numpy(), foreground.numpy())
        except Exception as exc:  # e.g. a batch size the graph was specialised away from
            raise ExportMismatch(f"{what} export of FOPA fails on a batch of {batch}: {exc}") from exc
        if actual.shape != expected.shape:
            raise ExportMismatch(f"{what} export of FOPA gives {OUTPUT_NAME} {actual.shape} for a batch of {batch}, "
                                 f"torch gives {expected.shape}")
        difference = float(np.abs(actual - expected).max())
        if not difference <= TOLERANCE:  # `not <=` so that a NaN difference fails too
            raise ExportMismatch(f"{what} export of FOPA differs from torch by {difference:.3g} (> {TOLERANCE:g}) "
                                 f"on a batch of {batch}")
        worst = max(worst, difference)
    return worst


def verify_onnx(model: FopaHeatmap, path: Path, batches: tuple[int, ...] = VERIFY_BATCHES) -> float:
    """Run `path` with onnxruntime and `model` with torch on random batches; return the largest difference."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        (heatmaps,) = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: background, INPUT_NAMES[1]: foreground})
        return heatmaps

    return _check_against_torch(model, run, "ONNX", batches)


def verify_program(model: FopaHeatmap, path: Path, batches: tuple[int, ...] = VERIFY_BATCHES) -> float:
    """Load `path` as the embedded-gpu model does (on the CPU here) and compare it with `model`."""
    program = torch.export.load(str(path)).module()

    def run(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return program(torch.from_numpy(background), torch.from_numpy(foreground)).numpy()

    return _check_against_torch(model, run, "torch.export", batches)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)


@contextmanager
def _publishing(net_or_weights_dir: FopaNet | Path, path: Path) -> Iterator[tuple[FopaHeatmap, Path]]:
    """Yield (model in eval mode, a partial path beside `path`); the partial file replaces `path`
    only if the block finishes. On any failure `path` is left as it was; a net passed in gets
    its own mode back afterwards."""
    net = net_or_weights_dir if isinstance(net_or_weights_dir, FopaNet) else load_fopa(Path(net_or_weights_dir))
    model = FopaHeatmap(net)
    was_training = net.training
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keeps the suffix: torch.export.save picks its format by it
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        model.eval()
        yield model, partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        net.train(was_training)


def export_onnx(net_or_weights_dir: FopaNet | Path, path: Path) -> Path:
    """Export FOPA's heatmap model to `path` as one self-contained ONNX file, verified against torch.

    `path` appears only once the check has passed; on any failure it is left as it was.
    The module is exported in eval mode; a net passed in gets its own mode back afterwards.
    """
    with _publishing(net_or_weights_dir, path) as (model, partial):
        batch = _batch_dim()
        torch.onnx.export(
            model,
            _fopa_inputs(_EXAMPLE_BATCH, torch.Generator().manual_seed(0)),
            str(partial),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            opset_version=OPSET_VERSION,
            dynamo=True,
            dynamic_shapes={"background": {0: batch}, "foreground": {0: batch}},
            # weights inside the graph file: an external-data file would be named
            # after the temporary path and lost in the rename
            external_data=False,
        )
        verify_onnx(model, partial)
    return Path(path)


def export_program(net_or_weights_dir: FopaNet | Path, path: Path) -> Path:
    """Export FOPA's heatmap model to `path` as a `torch.export` program (weights inside), verified
    against torch; all-or-nothing like `export_onnx`. Load it with the same torch version."""
    with _publishing(net_or_weights_dir, path) as (model, partial):
        batch = _batch_dim()
        program = torch.export.export(model, _fopa_inputs(_EXAMPLE_BATCH, torch.Generator().manual_seed(0)),
                                      dynamic_shapes={"background": {0: batch}, "foreground": {0: batch}})
        torch.export.save(program, str(partial))
        verify_program(model, partial)
    return Path(path)
