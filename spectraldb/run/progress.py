"""Progress of a sweep: a live rich display on a terminal, plain lines otherwise (the progress
file other processes read: spectraldb.sidecar.progress)."""

from __future__ import annotations

import sys


class PlainReporter:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.done = 0
        self.total = 0

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self._print(f"{total} runs to do ({skipped} already in the store)")

    def step(self, run_id: str, label: str, step: int, steps: int) -> None:
        pass

    def finish(self, run_id: str, label: str, status: str, seconds: float, detail: str = "") -> None:
        self.done += 1
        self._print(f"[{self.done}/{self.total}] {status:8s} {run_id} {label} ({seconds:.1f}s){detail}")

    def close(self) -> None:
        pass

    def note(self, text: str) -> None:
        self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichReporter(PlainReporter):
    """Overall bar plus one bar per running run (steps)."""

    def __init__(self, stream=None):
        super().__init__(stream)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(file=self.stream), transient=False)
        self.tasks: dict[str, int] = {}
        self.overall = None

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self.progress.start()
        self.progress.console.print(f"{total} runs to do ({skipped} already in the store)")
        self.overall = self.progress.add_task("runs", total=total)

    def step(self, run_id: str, label: str, step: int, steps: int) -> None:
        if run_id not in self.tasks:
            self.tasks[run_id] = self.progress.add_task(f"  {label} {run_id[:8]}", total=steps)
        self.progress.update(self.tasks[run_id], completed=step)

    def finish(self, run_id: str, label: str, status: str, seconds: float, detail: str = "") -> None:
        self.done += 1
        if run_id in self.tasks:
            self.progress.remove_task(self.tasks.pop(run_id))
        self.progress.console.print(f"{status:8s} {run_id} {label} ({seconds:.1f}s){detail}")
        self.progress.update(self.overall, completed=self.done)

    def close(self) -> None:
        self.progress.stop()

    def note(self, text: str) -> None:
        self.progress.console.print(text)


def reporter_for(stream=None) -> PlainReporter:
    stream = stream or sys.stderr
    return RichReporter(stream) if stream.isatty() else PlainReporter(stream)
