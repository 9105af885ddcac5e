"""Where the trainer's metrics go: ``metrics.jsonl`` always can, TensorBoard and Weights & Biases
when ``run.log_to`` asks for them (optional extras ``cusa[tensorboard]``, ``cusa[wandb]``).

Every sink gets the same records: one per logged step (``loss`` and each term, ``lr``,
``tau/<name>``, timings) and one per evaluation (``event: eval``, ``<split>/<metric>``). The
JSONL keeps the record as it is; TensorBoard and W&B get each number as a scalar of the same
name at ``global_step = record["step"]``. Only rank 0 writes.

W&B follows its own environment: ``WANDB_MODE=offline`` writes the run under
``<output_dir>/wandb`` without a network, ``WANDB_PROJECT`` names the project (default
``cusa``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Protocol

from cusa.errors import MissingExtraError

#: ``run.log_to`` name -> (module that must be importable, extra that installs it).
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
#: Record keys that are positions, not scalars.
_NOT_SCALARS = frozenset({"step", "epoch", "event"})


class MetricsSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_sinks(names: tuple[str, ...]) -> None:
    """Refuse a sink whose package is missing, before anything is built.

    Raises:
        MissingExtraError: naming the extra to install.
    """
    for name in names:
        module, extra = NEEDS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"run.log_to includes {name!r} but the {module!r} package is not installed; "
                f"pip install 'cusa[{extra}]' or remove {name!r} from run.log_to"
            )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record, by the name the JSONL gives them."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class JsonlLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLog:
    """Event files under ``<output_dir>/tensorboard`` (``tensorboard --logdir <output_dir>``)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A W&B run in ``<output_dir>`` (``WANDB_MODE=offline`` keeps it local)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cusa"),
            name=out_dir.name,
            dir=str(out_dir),
            config=config,
            reinit="finish_previous",
        )

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """Every sink ``run.log_to`` names; writes nothing on ranks other than 0."""

    def __init__(
        self, names: tuple[str, ...], out_dir: Path, config: dict[str, Any], enabled: bool
    ) -> None:
        self.sinks: list[MetricsSink] = []
        if not enabled:
            return
        for name in names:
            if name == "jsonl":
                self.sinks.append(JsonlLog(out_dir / "metrics.jsonl"))
            elif name == "tensorboard":
                self.sinks.append(TensorBoardLog(out_dir / "tensorboard"))
            elif name == "wandb":
                self.sinks.append(WandbLog(out_dir, config))

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
