"""`tunelab tune`: measure which sampling settings win on coding tasks, and hand back a Modelfile."""

from __future__ import annotations

import re
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tunelab.cli import app, console, err_console
from tunelab.errors import InvalidOption, ModelfileError
from tunelab.registry.modelfile import parse_modelfile
from tunelab.registry.store import Store
from tunelab.runtime import open_model
from tunelab.tune.backends import LocalEngineBackend, OpenAIEndpointBackend, parse_scripted_spec
from tunelab.tune.generation_cache import GenerationCache
from tunelab.tune.report import analyse, print_report, tuned_name, write_report
from tunelab.tune.evaluation import Progress
from tunelab.tune.search_space import KNOBS, Config, SearchSpace
from tunelab.tune.study import StudyInterrupted, StudySettings, TuningStudy
from tunelab.tune.suites import load_suite

_RANGE_HELP = "search range LOW:HIGH (one value fixes it)"


@app.command()
def tune(
    model: str = typer.Argument(..., help="model name or path; with --endpoint, the server's model name"),
    suite: str = typer.Option("all", help="builtin, humaneval, all, or a HumanEval-format .jsonl file"),
    space: Path = typer.Option(None, "--space", help="TOML file giving the search space in its search table"),
    temperature: str = typer.Option(None, help=_RANGE_HELP),
    top_p: str = typer.Option(None, help=_RANGE_HELP),
    top_k: str = typer.Option(None, help=_RANGE_HELP),
    min_p: str = typer.Option(None, help=_RANGE_HELP),
    repeat_penalty: str = typer.Option(None, help=_RANGE_HELP),
    presence_penalty: str = typer.Option(None, help=_RANGE_HELP),
    frequency_penalty: str = typer.Option(None, help=_RANGE_HELP),
    system: list[str] = typer.Option([], "--system", help="SYSTEM prompt variant NAME=TEXT; repeat to search several"),
    think: str = typer.Option(None, help="thinking: on, off, both (searched) or default"),
    think_budget: int = typer.Option(None, help="max thinking tokens when thinking is on"),
    trials: int = typer.Option(16, help="finished trials the search runs (the baselines included)"),
    samples: int = typer.Option(2, help="generations per task per trial"),
    confirm_top: int = typer.Option(3, help="best trials measured again before picking the winner"),
    confirm_samples: int = typer.Option(4, help="generations per task when confirming"),
    held_out_samples: int = typer.Option(4, help="generations per held-out task"),
    tuning_tasks: int = typer.Option(24, help="tuning tasks used by the search (0 = all)"),
    held_out_tasks: int = typer.Option(100, help="held-out tasks used for the final comparison (0 = all)"),
    held_out_fraction: float = typer.Option(0.5, help="share of the suite set aside as held-out"),
    seed: int = typer.Option(0, help="seeds the split, the samples and the sampler"),
    timeout: float = typer.Option(None, help="seconds after which no new trial starts"),
    num_predict: int = typer.Option(384, help="max tokens per generation"),
    sampler: str = typer.Option("tpe", help="tpe, random or grid"),
    grid_points: int = typer.Option(3, help="values per knob for --sampler grid"),
    stop_after_code: bool = typer.Option(False, help="stop each answer at its first closing ``` fence"),
    modelfile: Path = typer.Option(None, "--modelfile", help="your Modelfile, measured as one more baseline"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: SQLite in --out); postgresql://... "
                                           "lets several --worker processes share the study"),
    study_name: str = typer.Option(None, help="study name in the storage (default: from model, suite, seed)"),
    worker: bool = typer.Option(False, "--worker", help="only run search trials of an existing study, then exit"),
    out: Path = typer.Option(None, help="directory for the study, cache and report (default: ./tune-MODEL-SUITE)"),
    endpoint: str = typer.Option(None, help="an OpenAI-compatible server URL to generate with instead"),
    api_key: str = typer.Option(None, envvar="OPENAI_API_KEY", help="API key for --endpoint"),
    rows: int = typer.Option(16, help="generations in flight (rows of the batch)"),
    parallel_trials: int = typer.Option(2, help="trials in flight at once, so their rows share the batch"),
    num_thread: int = typer.Option(0, help="CPU threads for the local engine (0 = every core)"),
    create: str = typer.Option(None, help="also create the recommended model in the store under this name"),
    backend: str = typer.Option(None, hidden=True, help="scripted[:delay=S,ignore=KNOB/KNOB], for tests"),
):
    """Search sampling settings on coding tasks, compare the winner with the baselines on held-out tasks."""
    ranges = {name: value for name, value in zip(KNOBS, (temperature, top_p, top_k, min_p, repeat_penalty,
                                                         presence_penalty, frequency_penalty)) if value is not None}
    search_space = SearchSpace.load(space, ranges, _system_variants(system), think, think_budget)
    settings = StudySettings(
        model=model, suite=suite, space=search_space, trials=trials, samples=samples, confirm_top=confirm_top,
        confirm_samples=confirm_samples, held_out_samples=held_out_samples, tuning_tasks=tuning_tasks,
        held_out_tasks=held_out_tasks, held_out_fraction=held_out_fraction, seed=seed, num_predict=num_predict,
        sampler=sampler, grid_points=grid_points, stop_after_code=stop_after_code,
        modelfile_baseline=_modelfile_baseline(modelfile, search_space) if modelfile else None)
    out = out or Path(f"tune-{_slug(model)}-{_slug(suite)}")
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name or f"{model} {suite} seed {seed}"
    generator = _open_backend(model, suite, endpoint, api_key, backend, rows, num_thread)
    progress = Progress()
    study = TuningStudy(settings, generator, GenerationCache(out / "generations.db"), storage, study_name,
                        worker=worker, parallel_trials=parallel_trials, timeout_s=timeout, progress=progress,
                        on_warning=lambda text: err_console.print(f"[yellow]warning:[/] {text}"))
    previous_handler = signal.signal(signal.SIGINT, _stop_on_first_interrupt(study))
    try:
        with _progress_view(progress):
            results = study.run()
    except StudyInterrupted:
        err_console.print("interrupted: rerun the same command to resume the study")
        sys.exit(130)  # the shell's code for an interrupt; click would turn it into a plain return
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if isinstance(generator, LocalEngineBackend):
            generator.runtime.close()
    if results is None:
        console.print(f"worker done: {progress.trials_done} of {progress.trials_total} trials finished in the study")
        return
    report = analyse(results)
    command = "tunelab " + shlex.join(sys.argv[1:])
    tuned_model = create or tuned_name(model)
    paths = write_report(report, out, model, command, tuned_model)
    print_report(console if console.is_terminal else Console(width=120), report)  # a log has room for the table
    console.print(f"{results.generated} generations in {results.wall_s / 60:.1f} min "
                  f"({results.generated / max(results.wall_s, 1e-9):.2f}/s); report: {paths['markdown']}, "
                  f"{paths['html']}; Modelfile: {paths['modelfile']}; aider: {paths['aider']}")
    if create:
        record = Store().create(create, parse_modelfile(paths["modelfile"].read_text(encoding="utf-8")))
        console.print(f"created {record.name}: try `tunelab run {record.name}`")
    else:
        console.print(f"to use it: tunelab create {tuned_model} -f {paths['modelfile']}")


def _stop_on_first_interrupt(study: TuningStudy):
    """Ctrl-C stops the study cleanly (unfinished trials are handed back); a second one quits at once."""
    def handle(signum, frame):
        if study.is_stopping:
            raise KeyboardInterrupt
        study.stop()
    return handle


def _open_backend(model: str, suite: str, endpoint: str | None, api_key: str | None, backend: str | None,
                  rows: int, num_thread: int):
    if backend is not None:
        if not backend.startswith("scripted"):
            raise InvalidOption(f"unknown --backend {backend!r}; leave it out, or use --endpoint URL")
        return parse_scripted_spec(backend, load_suite(suite))
    if endpoint is not None:
        return OpenAIEndpointBackend(endpoint, model, api_key, max_in_flight=rows)
    runtime = open_model(model, options={"num_thread": num_thread}, max_num_seqs=rows, start_engine=True)
    return LocalEngineBackend(runtime)


def _system_variants(values: list[str]) -> dict[str, str] | None:
    variants = {}
    for value in values:
        name, has_text, text = value.partition("=")
        if not has_text or not name:
            raise InvalidOption(f"--system {value!r} needs NAME=TEXT, e.g. --system terse='Answer with code only.' "
                                "(NAME= with no text means no system prompt)")
        variants[name] = text
    return variants or None


def _modelfile_baseline(path: Path, space: SearchSpace) -> Config:
    try:
        parsed = parse_modelfile(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelfileError(f"cannot read Modelfile {path}: {exc.strerror}; check the --modelfile path") from None
    knobs = {name: value for name, value in parsed.parameters.items() if name in KNOBS}
    system = parsed.system if parsed.system is not None else next(iter(space.systems.values()))
    return Config("your modelfile", knobs, system, parsed.parameters.get("think"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(text).name).strip("-") or "model"


@contextmanager
def _progress_view(progress: Progress):
    """A live table on a terminal; a status line a minute when the output is a file."""
    if console.is_terminal:
        with Live(get_renderable=lambda: _progress_table(progress), console=console, refresh_per_second=2):
            yield
        return
    done = threading.Event()

    def report():
        while not done.wait(60.0):
            console.print(_progress_line(progress), highlight=False)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _progress_table(progress: Progress) -> Table:
    table = Table.grid(padding=(0, 2))
    for name, value in (("stage", progress.stage), ("trials", f"{progress.trials_done}/{progress.trials_total}"),
                        ("best so far", progress.best or "-"), ("generations", _generations(progress)),
                        ("ETA", _eta(progress))):
        table.add_row(f"[bold]{name}[/]", value)
    return table


def _progress_line(progress: Progress) -> str:
    return (f"[{time.strftime('%H:%M:%S')}] {progress.stage}: trials {progress.trials_done}/{progress.trials_total}, "
            f"best {progress.best or '-'}, {_generations(progress)}, ETA {_eta(progress)}")


def _generations(progress: Progress) -> str:
    return (f"{progress.generated} drawn + {progress.cached} cached, {progress.generations_per_s():.2f}/s, "
            f"{progress.tokens} tokens")


def _eta(progress: Progress) -> str:
    eta = progress.eta_s()
    return "-" if eta is None else f"{eta / 60:.0f} min"
