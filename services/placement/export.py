"""FOPA as ONNX: the file both Triton targets serve (DESIGN §3, the tritonserver row).

The exported graph is `FopaHeatmap` (sigmoid heatmaps) with a dynamic batch axis.
Every export is checked against torch before it is published: a graph that
exports cleanly but computes something else must never reach a server.
"""

from __future__ import annotations

import os
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


def verify_onnx(model: FopaHeatmap, path: Path, batches: tuple[int, ...] = VERIFY_BATCHES) -> float:
    """Run `path` with onnxruntime and `model` with torch on random batches; return the largest difference.

    Raises ExportMismatch if any batch differs by more than TOLERANCE or has the wrong shape.
    """
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in batches:
        background, foreground = _fopa_inputs(batch, generator)
        with torch.no_grad():
            expected = model(background, foreground).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: background.numpy(), INPUT_NAMES[1]: foreground.numpy()})
        if actual.shape != expected.shape:
            raise ExportMismatch(f"ONNX export of FOPA gives {OUTPUT_NAME} {actual.shape} for a batch of {batch}, "
                                 f"torch gives {expected.shape}")
        difference = float(np.abs(actual - expected).max())
        if not difference <= TOLERANCE:  # `not <=` so that a NaN difference fails too
            raise ExportMismatch(f"ONNX export of FOPA differs from torch by {difference:.3g} (> {TOLERANCE:g}) "
                                 f"on a batch of {batch}")
        worst = max(worst, difference)
    return worst


def export_onnx(net_or_weights_dir: FopaNet | Path, path: Path) -> Path:
    """Export FOPA's heatmap model to `path` as one self-contained ONNX file, verified against torch.

    `path` appears only once the check has passed; on any failure it is left as it was.
    The module is exported in eval mode; a net passed in gets its own mode back afterwards.
    """
    net = net_or_weights_dir if isinstance(net_or_weights_dir, FopaNet) else load_fopa(Path(net_or_weights_dir))
    model = FopaHeatmap(net)
    was_training = net.training
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        model.eval()
        batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
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
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        net.train(was_training)
    return path
