"""Where training metrics go besides metrics.jsonl: a CSV file next to it, TensorBoard event files.

    sinks = metric_sinks(["csv", "tensorboard"], run_dir / "metrics.jsonl")
    for sink in sinks: sink(record)      # record: {"step": int, "time": s, "lr": ..., "loss": ..., ...}

The `Trainer` calls every sink with each record right after it is appended to metrics.jsonl, which stays
the log of record: the CSV is rebuilt from it on the first record of a process (so a resumed run, whose
metrics.jsonl was cut back to its checkpoint, gets the same cut), and TensorBoard's writer starts at that
first step (`purge_step`), dropping the events a killed run wrote past its checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

from .errors import ConfigError, VQVAEError

LOGS = ("csv", "tensorboard")
Sink = Callable[[dict], None]


class CSVSink:
    """metrics.csv next to metrics.jsonl: one row per record, one column per key (in order of appearance)."""

    def __init__(self, metrics_path: Path):
        self.metrics_path = Path(metrics_path)
        self.path = self.metrics_path.with_suffix(".csv")
        self.columns: list[str] | None = None

    def __call__(self, record: dict) -> None:
        if self.columns is not None and set(record) <= set(self.columns):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(record)
            return
        self.rebuild()

    def rebuild(self) -> None:
        """Write the whole CSV from metrics.jsonl (atomically)."""
        from .config import write_atomically

        records = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        self.columns = list(dict.fromkeys(key for r in records for key in r))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns)
        writer.writeheader()
        writer.writerows(records)
        data = text.getvalue().encode()
        write_atomically(self.path, lambda f: f.write(data))


class TensorBoardSink:
    """Event files under tensorboard/ next to metrics.jsonl: scalar `{tag}/{key}` at each record's step."""

    def __init__(self, metrics_path: Path, tag: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise VQVAEError("--log tensorboard needs the tensorboard package: pip install 'vqvae[log]'") from None
        self.SummaryWriter, self.tag = SummaryWriter, tag
        self.log_dir = Path(metrics_path).parent / "tensorboard"
        self.writer = None

    def __call__(self, record: dict) -> None:
        step = record["step"]
        if self.writer is None:
            self.writer = self.SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.tag}/{key}", value, step)
        self.writer.flush()


def metric_sinks(logs: list[str] | tuple[str, ...], metrics_path: Path, tag: str = "train") -> list[Sink]:
    """The sinks `logs` names ("csv", "tensorboard"; a comma-separated entry counts as several) for the log
    at `metrics_path`. Raises ConfigError for an unknown name, VQVAEError when tensorboard is missing."""
    names = [name.strip() for entry in logs for name in entry.split(",") if name.strip()]
    for name in names:
        if name not in LOGS:
            raise ConfigError(f"--log must be one of {', '.join(LOGS)}, got {name!r}")
    sinks: list[Sink] = []
    if "csv" in names:
        sinks.append(CSVSink(metrics_path))
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(metrics_path, tag))
    return sinks
