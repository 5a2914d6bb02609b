"""Storage of the small models trained here: safetensors weights with a JSON config beside them.

FOPA, RAIN and the affinity head each ship a folder ``{config.json, <name>.safetensors}``;
the functions here are the one way such a folder is written, read and named, and
`training_log` is where a training script's progress goes beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from freemask.shared.errors import InvalidInput

CONFIG_FILE = "config.json"


def save_small_model(net: nn.Module, config: Any, directory: Path, weights_file: str) -> None:
    """Write `net`'s weights and its dataclass `config` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(directory / weights_file))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")


def load_small_model(model_class: Any, config_class: Any, directory: Path, weights_file: str, model: str) -> Any:
    """``model_class(config_class(**config))`` with the folder's weights, in eval mode; `model` names it in errors."""
    directory = Path(directory)
    missing = [name for name in (CONFIG_FILE, weights_file) if not (directory / name).is_file()]
    if missing:
        raise InvalidInput(f"no {model} weights in {directory}: missing {', '.join(missing)}")
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    net = model_class(config_class(**config))
    net.load_state_dict(load_file(str(directory / weights_file)))
    return net.eval()


def small_model_version(directory: Path, weights_file: str) -> str:
    """`ModelVersion.version` of a folder's weights: a digest of its config and safetensors file."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, weights_file):
        digest.update((Path(directory) / name).read_bytes())
    return "sha256-" + digest.hexdigest()[:16]


@contextmanager
def training_log(logger: logging.Logger, directory: Path) -> Iterator[None]:
    """For the block, `logger`'s INFO records also go to ``directory/train_log.txt``, stamped in UTC."""
    handler = logging.FileHandler(directory / "train_log.txt", mode="w", encoding="utf-8")
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime  # this formatter only: the process's other logs keep their clock
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
