"""What tailor's subcommands share: option types, `--set` parsing, checks that fail before a model loads, progress
bars, and the `--ray [ADDRESS]` option. A leaf: it imports no subcommand, and heavy modules only inside functions, so
`tailor --help` stays fast."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Mapping, Optional, Sequence

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:  # the runner imports torch; `tailor --help` should not
    from tailor.backbone.model import Backbone
    from tailor.distributed.ray_runner import RayOptions
    from tailor.methods.base import Personalizer
    from tailor.runs.spec import EvalSpec

console = Console(stderr=True)

TaskName = Annotated[str, typer.Option(help="lamp1, lamp2n, lamp2m, lamp3, lamp4, lamp5, lamp7, or a task file "
                                             "(my-task.toml; see examples/README.md)")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="LaMP data folder (default: $TAILOR_DATA, "
                                                 "then ../shared/lamp)")]
UsersFile = Annotated[Optional[Path], typer.Option(
    "--data", help="users file (JSONL, one user per line) whose users are answered, instead of LaMP's --split")]
TrainUsersFile = Annotated[Optional[Path], typer.Option(
    "--train-data", help="users file (JSONL) that methods fit on; goes with --data")]
Model = Annotated[str, typer.Option(help="packaged model (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b) or "
                                         "a local HF folder")]
Device = Annotated[str, typer.Option(help="auto (a CUDA GPU when present, else the CPU), cpu, cuda, cuda:N or mps")]
Dtype = Annotated[str, typer.Option(help="auto (bfloat16 where the device computes it in hardware, else float32), "
                                         "float32, bfloat16 or float16")]
SetOptions = Annotated[list[str], typer.Option("--set", help="method option KEY=VALUE (repeatable)")]
Users = Annotated[Optional[int], typer.Option(help="a seeded sample of this many users (default: all)")]
Variant = Annotated[str, typer.Option(help="user (LaMP's user-based split) or time")]
ChunkUsers = Annotated[int, typer.Option(help="users per checkpointed chunk")]
BatchSize = Annotated[Optional[int], typer.Option(help="rows per forward pass (default 8)")]

LOCAL = "local"
"""The value of a bare `--ray`: start a local cluster (with an address, the run joins that cluster)."""
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="run on Ray: alone, start a local cluster; with an address (auto, host:6379, ray://host:10001), join it")]
Workers = Annotated[int, typer.Option(help="Ray workers (actors), each with its own backbone")]
WorkerThreads = Annotated[int, typer.Option(help="torch threads (and Ray CPUs) per Ray worker")]
GpusPerWorker = Annotated[float, typer.Option(help="GPUs per Ray worker (fractions share a GPU); 0: CPU workers")]

DEFAULT_BATCH_SIZE = 8


def threads() -> None:
    """Torch threads: $TAILOR_THREADS, else every core."""
    import torch

    torch.set_num_threads(int(os.environ.get("TAILOR_THREADS", os.cpu_count() or 1)))


class LoggedProgress:
    """A progress bar for a console that is not a terminal (a log file under nohup, CI): a line when it starts, at every
    tenth of the total and at least every `every` seconds, where rich's live bar writes nothing until it ends. `beat`
    writes the minute's line when nothing advanced: one item (a batch of users, a fit's preparation) can take minutes,
    and a silent log looks like a hung run."""

    def __init__(self, out: Console, description: str, done: int, total: int, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.description, self.total, self.every, self.clock = out, description, total, every, clock
        self.done = self.first = done
        self.started = self.written = clock()
        self.tenth = self._tenth()
        self.lock = threading.Lock()
        self._write()

    def _tenth(self) -> int:
        return self.done * 10 // max(self.total, 1)

    def _write(self) -> None:
        elapsed = self.written - self.started
        line = f"{self.description}: {self.done}/{self.total}, {elapsed:.0f} s"
        if self.first < self.done < self.total:
            line += f", eta {elapsed / (self.done - self.first) * (self.total - self.done):.0f} s"
        self.out.print(line, highlight=False, markup=False)

    def __call__(self, n: int) -> None:
        if not n:
            return
        with self.lock:
            self.done += n
            now = self.clock()
            if self._tenth() > self.tenth or now - self.written >= self.every:
                self.tenth, self.written = self._tenth(), now
                self._write()

    def beat(self) -> None:
        """A line if the bar has written none for `every` seconds and is not finished."""
        with self.lock:
            now = self.clock()
            if self.done < self.total and now - self.written >= self.every:
                self.written = now
                self._write()


HEARTBEAT_S = 5.0
"""How often the thread behind logged bars asks each of them for its minute's line."""


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], Callable[[int], None]]]:
    """`start(description, done, total)` adds a bar and returns its `advance(n)`: a live bar on a terminal, lines
    (`LoggedProgress`) otherwise. Bars run one after another (fit, then personalize), so the heartbeat asks only the
    newest logged bar for its minute's line: one left below its total by the phase before stays quiet."""
    if not console.is_terminal:
        bars: list[LoggedProgress] = []
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(HEARTBEAT_S):
                if bars:
                    bars[-1].beat()

        def start(description: str, done: int, total: int) -> Callable[[int], None]:
            bars.append(LoggedProgress(console, description, done, total))
            return bars[-1]

        thread = threading.Thread(target=heartbeat, name="progress-heartbeat", daemon=True)
        thread.start()
        try:
            yield start
        finally:
            stop.set()
            thread.join()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as bar:
        def start(description: str, done: int, total: int) -> Callable[[int], None]:
            task_id = bar.add_task(description, total=total, completed=done)
            return lambda n: bar.advance(task_id, n)
        yield start


def set_pairs(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs as text, dashes in keys read as underscores; `check_options` reads each value as its
    option's type."""
    from tailor.methods.options import OptionError, pairs as read_pairs

    try:
        return read_pairs(pairs, "--set")
    except OptionError as error:
        raise typer.BadParameter(str(error)) from None


def parse_options(pairs: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs with ints, floats and true/false cast by their look, for code that has no method's
    config to read them by (the benchmark scripts parse their `--set` with this)."""
    from tailor.methods.options import by_look

    return by_look(set_pairs(pairs))


def merge_flags(options: dict[str, object], flags: dict[str, object | None]) -> dict[str, object]:
    """The method options of `--set` and of the flags (`--k 2`, `--batch-size 4`, ...), with the default batch size.

    The flags are shorthands for `--set` options; a flag left out leaves the `--set` value alone, and one option
    given both ways with different values is refused, not silently resolved.
    """
    merged = {"batch_size": DEFAULT_BATCH_SIZE, **options}
    for name, value in flags.items():
        if value is None:
            continue
        if name in options and options[name] != value:
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{flag} {value} and --set {name}={options[name]} disagree; give one")
        merged[name] = value
    return merged


def resolve_method(method: str) -> type[Personalizer]:
    """The method's class: a registered name or module:Class; an unknown one fails in one line at --method."""
    from tailor.methods import method_class

    try:
        return method_class(method)
    except KeyError as error:
        raise typer.BadParameter(error.args[0], param_hint="--method") from None


def check_options(method: str, options: Mapping[str, object]) -> dict[str, object]:
    """The options as the method's config types them (`tailor.methods.options`), checked before anything loads;
    a bad one fails in one line naming the option."""
    from tailor.methods.options import OptionError, typed_options

    try:
        return typed_options(resolve_method(method), options)
    except OptionError as error:
        raise typer.BadParameter(f"--set {error}" if error.assignment else str(error),
                                 param_hint="--set" if error.by_config else None) from None


def check_spec(spec: EvalSpec) -> None:
    """A bad task or task file, split, user count, data folder or users file fails in one line before the model
    loads."""
    from tailor.data.lamp import DataError

    try:
        spec.check()
    except DataError:
        raise  # main() prints it in one line, as for bad data found later
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def checked_spec(method: str, options: Mapping[str, object], model: str, data_dir: Path | None, task: str,
                 data: Path | None = None, train_data: Path | None = None, **fields: object) -> EvalSpec:
    """The run's spec, its method options (typed) and the spec itself checked, one line each, before anything
    loads; the model is recorded only for methods that use one, and a task file and users files by absolute path."""
    from tailor.runs.spec import EvalSpec

    typed = check_options(method, options)
    spec = EvalSpec(method=method, options=typed, model=model if resolve_method(method).needs_backbone else None,
                    data_dir=str(data_dir) if data_dir else None, task=task,
                    data=str(data) if data else None, train_data=str(train_data) if train_data else None,
                    **fields).portable()  # type: ignore[arg-type]
    check_spec(spec)
    return spec


def check_device(device: str, dtype: str) -> None:
    """A device this machine does not have, or a precision it cannot compute in, is one line before anything loads."""
    from tailor.backbone.device import DeviceError, resolve_device, resolve_dtype

    try:
        resolve_dtype(dtype, resolve_device(device))
    except DeviceError as error:
        raise typer.BadParameter(str(error)) from None


def load_backbone(model: str, device: str, dtype: str) -> Backbone:
    from tailor.backbone.device import dtype_name, resolve_device, resolve_dtype
    from tailor.backbone.model import Backbone

    where = resolve_device(device)
    with console.status(f"loading {model} on {where} in {dtype_name(resolve_dtype(dtype, where))}"):
        return Backbone.load(model, device=device, dtype=dtype)


def build(method: str, task: str, model: str, device: str, dtype: str, options: dict[str, object]) -> Personalizer:
    """The method on its backbone (loaded only when the method needs one), in this process."""
    from tailor.methods import build_method
    from tailor.tasks.lamp import get_task

    threads()
    backbone = load_backbone(model, device, dtype) if resolve_method(method).needs_backbone else None
    return build_method(method, get_task(task), backbone, **options)


def ray_argv(argv: Sequence[str]) -> list[str]:
    """The arguments with a bare `--ray` given its LOCAL value.

    Typer has no options with an optional value, so `tailor.cli.main.main` passes its arguments through this: a
    `--ray` at the end or followed by another option becomes `--ray local`; `--ray ADDRESS` and `--ray=ADDRESS` are
    kept.
    """
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(LOCAL)
    return out


def ray_options(address: str, workers: int, threads: int, gpus: float = 0.0) -> RayOptions:
    import torch

    from tailor.distributed.ray_runner import RayOptions

    if workers < 1 or threads < 1:
        raise typer.BadParameter("--workers and --worker-threads must be at least 1")
    if gpus < 0:
        raise typer.BadParameter("--gpus-per-worker must be 0 or more")
    if gpus > 0 and address == LOCAL and not torch.cuda.is_available():
        raise typer.BadParameter(f"--gpus-per-worker {gpus}: this machine has no CUDA device for a local cluster")
    return RayOptions(address=None if address == LOCAL else address, workers=workers, threads=threads, gpus=gpus)


@contextmanager
def ray_errors() -> Iterator[None]:
    """Failed users end the command with exit code 1 (every other user is saved); a worker that cannot start (bad
    method options, a fit that raises) with exit code 2, like tailor's other user errors. One line each."""
    from tailor.distributed.ray_runner import UsersFailed, WorkerStartError

    try:
        yield
    except UsersFailed as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except WorkerStartError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
