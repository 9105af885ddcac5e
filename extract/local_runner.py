"""The local runner: one process, a reader thread preparing batches while the teachers encode."""

from __future__ import annotations

import queue
import threading

from .batches import RunnerJob, encode_row, prepare_shard
from .job import END, IMAGE, TEXT

#: Prepared batches the reader thread may hold ahead of the teachers.
PREFETCH_ROWS = 4
_DONE = object()


def run_local(job: RunnerJob) -> None:
    """In-process runner: same batches as the Ray runner, so the same bits.

    A reader thread reads and prepares the next batches while the teachers encode the
    current one (JPEG decoding and PIL resizing release the GIL); the queue is bounded, so
    host memory stays at ``batch_size x PREFETCH_ROWS`` prepared items whatever the dataset size.
    """
    config, teachers, writer = job.config, job.teachers, job.writer
    image_t, text_t = teachers.get(IMAGE), teachers.get(TEXT)
    rows: queue.Queue = queue.Queue(maxsize=PREFETCH_ROWS)
    stop = threading.Event()

    def produce() -> None:
        try:
            for shard in job.shards:
                for row in prepare_shard(job.reader, shard, image_t, text_t, config.batch_size):
                    while not stop.is_set():
                        try:
                            rows.put(row, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            rows.put(_DONE)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            rows.put(exc)

    thread = threading.Thread(target=produce, name="cusa-read", daemon=True)
    thread.start()
    try:
        while True:
            row = rows.get()
            if row is _DONE:
                break
            if isinstance(row, BaseException):
                raise row
            if row.kind == END:
                writer.add_end(row.shard, row.meta)
                continue
            feats, secs = encode_row(row, teachers[row.kind])
            job.summary.add_stage(f"{row.kind} teacher", secs, len(row.ids))
            job.progress.advance(f"{row.kind} teacher", len(row.ids))
            writer.add_features(row.shard, row.kind, row.seq, row.ids, feats)
    finally:
        stop.set()
        thread.join(timeout=10)


__all__ = ["PREFETCH_ROWS", "run_local"]
