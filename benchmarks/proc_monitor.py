"""Memory and CPU time of a process tree, read from ``/proc`` (Linux): peak RSS (``VmHWM``) and
its reset, CPU seconds, and :class:`TreeMonitor`, which polls every process under a root and keeps
each one's peak. Used by :mod:`benchmarks.scale`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` of ``pid`` in bytes ({} if gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (all its threads), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class TreeMonitor:
    """Polls the process tree under ``root`` and keeps each process's peak memory.

    Ray renames its workers (``ray::IDLE``, then ``ray::MapWorker(...)``...), so a process is
    labelled by the most specific name it had.
    """

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.procs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in _descendants(self.root):
                status = proc_status(pid)
                if not status:
                    continue
                rec = self.procs.setdefault(pid, {"pid": pid, "names": [], "peak": {}})
                name = _cmdline(pid)
                if name and name not in rec["names"]:
                    rec["names"].append(name)
                for key, value in status.items():
                    rec["peak"][key] = max(rec["peak"].get(key, 0), value)
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    rec["cpu_s"] = max(rec.get("cpu_s", 0.0), cpu)
            self._stop.wait(self.interval)

    def report(self) -> list[dict[str, Any]]:
        rows = []
        for rec in self.procs.values():
            peak, names = rec["peak"], rec["names"]
            ray_names = [n for n in names if n.startswith("ray::")]
            busy = [n for n in ray_names if "IDLE" not in n]
            name = (busy or ray_names or names or [""])[-1]
            rows.append(
                {
                    "pid": rec["pid"],
                    "role": _role(rec["pid"], names, self.root),
                    "name": name[:120],
                    "peak_rss_mb": mib(max(peak.get("VmHWM", 0), peak.get("VmRSS", 0))),
                    "peak_anon_mb": mib(peak.get("RssAnon")),
                    "peak_shmem_mb": mib(peak.get("RssShmem")),
                    "cpu_s": round(rec.get("cpu_s", 0.0), 2),
                }
            )
        return sorted(rows, key=lambda r: (r["role"], -(r["peak_rss_mb"] or 0)))


def _role(pid: int, names: list[str], root: int) -> str:
    text = " ".join(names)
    if pid == root:
        return "driver"
    if "ray::" in text or "default_worker.py" in text or "setup_worker.py" in text:
        return "ray worker"
    if "ray" in text:
        return "ray system"
    return "other"
