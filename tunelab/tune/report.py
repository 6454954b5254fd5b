"""What a study found, said for people and for tools.

`analyse` turns held-out results into claims a reader can trust: the winner
against every baseline as a paired bootstrap 95 % interval on the pass@1
difference ("inconclusive" when it crosses zero), failure rates with counts
and Wilson intervals, and a recommendation: Qwen's preset unless the winner is
significantly better than it. `write_report` saves results.json (versioned),
report.md and report.html with plots, a ready Modelfile and an aider
`.aider.model.settings.yml` entry; `print_report` shows the tables in a terminal.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from rich.console import Console
from rich.table import Table

from tunelab.registry.modelfile import Modelfile, format_modelfile
from tunelab.tune.statistics import Interval, pass_at_1_difference, verdict, wilson_interval
from tunelab.tune.evaluation import ArmResult, failure_types
from tunelab.tune.search_space import Config
from tunelab.tune.study import StudyResults

SCHEMA_VERSION = 1
# Failures users complain about most, counted together (spec tuning.md §8, goal 2).
DEGENERATE = ("runaway", "repetition_loop", "unclosed_think", "off_script", "no_code_block")
AIDER_KNOBS = ("top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class Comparison:
    """The winner minus one baseline on the held-out tasks."""

    baseline: str
    difference: Interval  # pass@1 points as fractions, paired bootstrap 95 %
    verdict: str  # "better", "worse" or "inconclusive" (for the winner)
    same_config: bool  # the baseline is the winner's own configuration


@dataclass(frozen=True)
class FailureRate:
    """How often one failure type occurred in an arm's generations."""

    count: int
    total: int
    interval: Interval  # Wilson 95 %


@dataclass
class Report:
    """The analysed study."""

    results: StudyResults
    comparisons: list[Comparison]
    failure_rates: dict[str, dict[str, FailureRate]]  # arm name -> failure type -> rate
    recommended: Config
    reason: str


def analyse(results: StudyResults) -> Report:
    """Compare the winner with every baseline on the held-out tasks and pick what to recommend."""
    winner, *others = results.held_out
    comparisons = [Comparison(arm.config.name, pass_at_1_difference(winner.outcomes(), arm.outcomes(), seed=i),
                              "", arm.params_hash == winner.params_hash) for i, arm in enumerate(others)]
    comparisons = [Comparison(c.baseline, c.difference, verdict(c.difference), c.same_config) for c in comparisons]
    rates = {arm.config.name: failure_rates(arm) for arm in results.held_out}
    vendor_index = _vendor_index(others, winner.config.think)
    vendor, against_vendor = others[vendor_index], comparisons[vendor_index]
    won = results.winner.config.name
    if against_vendor.same_config:
        recommended, reason = vendor.config, f"the search's best configuration ({won}) is Qwen's preset itself"
    elif against_vendor.verdict == "better":
        recommended = Config(f"tuned ({won})", winner.config.knobs, winner.config.system, winner.config.think)
        reason = f"the winner ({won}) beats Qwen's preset on held-out tasks by {_points(against_vendor.difference)}"
    else:
        recommended = vendor.config
        reason = (f"the winner ({won}) is not significantly better than Qwen's preset on held-out tasks "
                  f"({_points(against_vendor.difference)}: {against_vendor.verdict}); keep the vendor preset")
    return Report(results, comparisons, rates, recommended, reason)


def failure_rates(arm: ArmResult) -> dict[str, FailureRate]:
    """Every failure type seen in `arm`, plus the combined degeneration rate, with Wilson intervals."""
    scores = arm.all_scores()
    counts: dict[str, int] = {}
    for score in scores:
        found = failure_types(score)
        for name in found:
            counts[name] = counts.get(name, 0) + 1
        if any(name in DEGENERATE for name in found):
            counts["degenerate"] = counts.get("degenerate", 0) + 1
    counts.setdefault("degenerate", 0)
    return {name: FailureRate(count, len(scores), wilson_interval(count, len(scores)))
            for name, count in sorted(counts.items())}


def print_report(console: Console, report: Report) -> None:
    """The held-out table and the recommendation, in the terminal."""
    results = report.results
    table = Table(title=f"Held-out: {len(results.held_out_tasks)} tasks x {results.settings.held_out_samples} "
                        "samples (winner minus each baseline, paired bootstrap 95 % CI)", header_style="bold")
    for column in ("configuration", "pass@1 %", "winner - it [95% CI]", "verdict", "degenerate", "tokens"):
        table.add_column(column, justify="left" if column in ("configuration", "verdict") else "right",
                         no_wrap=column != "configuration")
    for name, pass_at_1, difference, interval, verdict_text, degenerate, tokens in held_out_rows(report):
        table.add_row(name, pass_at_1, f"{difference} {interval}".strip(), verdict_text,
                      degenerate.split(" [")[0], tokens)
    console.print(table)
    for sentence in verdict_sentences(report):
        console.print(sentence, markup=False, highlight=False)
    console.print(f"[bold]Recommendation:[/] {report.recommended.name}: {_knob_text(report.recommended.knobs)}")
    console.print(f"  because {report.reason}")


def held_out_rows(report: Report) -> list[list[str]]:
    """One row per held-out arm: name, pass@1, difference, interval, verdict, degeneration, tokens."""
    rows = []
    differences = {c.baseline: c for c in report.comparisons}
    for arm in report.results.held_out:
        degenerate = report.failure_rates[arm.config.name]["degenerate"]
        c = differences.get(arm.config.name)
        difference = ["", "", ""] if c is None else [
            f"{100 * c.difference.estimate:+.1f}", f"[{100 * c.difference.low:+.1f}, {100 * c.difference.high:+.1f}]",
            "same config" if c.same_config else c.verdict]
        rows.append([arm.config.name, f"{100 * arm.pass_at_1():.1f}", *difference,
                     f"{degenerate.count}/{degenerate.total} [{100 * degenerate.interval.low:.1f}-"
                     f"{100 * degenerate.interval.high:.1f}%]", f"{arm.mean_tokens():.0f}"])
    return rows


def write_report(report: Report, out_dir: Path, model_name: str, command: str = "",
                 tuned_model: str | None = None) -> dict[str, Path]:
    """Write results.json, report.md (+ PNG plots), report.html, Modelfile and .aider.model.settings.yml.

    The aider entry names `tuned_model`, the model the Modelfile is to be created as (default: NAME:TAG-tuned).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(report)
    for name, png in plots.items():
        (out_dir / f"{name}.png").write_bytes(png)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html",
             "modelfile": out_dir / "Modelfile", "aider": out_dir / ".aider.model.settings.yml"}
    paths["json"].write_text(json.dumps(results_json(report, command), indent=2), encoding="utf-8")
    paths["markdown"].write_text(markdown(report, command, {n: f"{n}.png" for n in plots}), encoding="utf-8")
    paths["html"].write_text(html_page(report, command, plots), encoding="utf-8")
    paths["modelfile"].write_text(modelfile_text(report.recommended, model_name), encoding="utf-8")
    paths["aider"].write_text(aider_settings(report.recommended, tuned_model or tuned_name(model_name),
                                             report.results.num_ctx), encoding="utf-8")
    return paths


def results_json(report: Report, command: str = "") -> dict[str, Any]:
    """Everything the study measured, as JSON with a schema_version."""
    results = report.results

    def arm_json(arm: ArmResult) -> dict[str, Any]:
        return {"name": arm.config.name, "config": asdict(arm.config), "params_hash": arm.params_hash,
                "pass_at_1": arm.pass_at_1(), "generations": len(arm.all_scores()), "mean_tokens": arm.mean_tokens(),
                "mean_latency_s": arm.mean_latency_s(), "outcomes": arm.outcomes()}

    return {
        "schema_version": SCHEMA_VERSION, "command": command, "study_name": results.study_name,
        "settings": results.settings.to_json(), "tuning_tasks": results.tuning_tasks,
        "held_out_tasks": results.held_out_tasks, "dropped_knobs": results.dropped_knobs, "trials": results.trials,
        "confirmed": [arm_json(arm) for arm in results.confirmed], "winner": asdict(results.winner.config),
        "held_out": [{**arm_json(arm), "failures": {name: {"count": r.count, "total": r.total, **asdict(r.interval)}
                                                    for name, r in report.failure_rates[arm.config.name].items()}}
                     for arm in results.held_out],
        "comparisons": [{"baseline": c.baseline, **asdict(c.difference), "verdict": c.verdict,
                         "same_config": c.same_config} for c in report.comparisons],
        "recommendation": {"config": asdict(report.recommended), "reason": report.reason},
        "throughput": {"wall_s": results.wall_s, "generated": results.generated, "tokens": results.tokens,
                       "generations_per_s": results.generated / max(results.wall_s, 1e-9),
                       "tokens_per_s": results.tokens / max(results.wall_s, 1e-9)},
    }


def modelfile_text(config: Config, model_name: str) -> str:
    """A Modelfile that builds the recommended configuration on top of `model_name`."""
    parameters: dict[str, Any] = dict(config.knobs)
    if config.think is not None:
        parameters["think"] = config.think
    return format_modelfile(Modelfile(from_=model_name, parameters=parameters, system=config.system or None))


def aider_settings(config: Config, model_name: str, num_ctx: int) -> str:
    """An aider `.aider.model.settings.yml` entry for the model built from the Modelfile."""
    extra = {name: config.knobs[name] for name in AIDER_KNOBS if name in config.knobs}
    entry: dict[str, Any] = {"name": f"ollama_chat/{model_name}"}
    if "temperature" in config.knobs:
        entry["use_temperature"] = config.knobs["temperature"]
    entry["extra_params"] = {**extra, "num_ctx": num_ctx}
    return yaml.safe_dump([entry], sort_keys=False)


def tuned_name(model_name: str) -> str:
    """The name suggested for the tuned model: the same name with `-tuned` on its tag."""
    base, _, tag = model_name.rpartition(":") if ":" in model_name else (model_name, "", "latest")
    return f"{base}:{tag}-tuned"


def make_plots(report: Report) -> dict[str, bytes]:
    """PNG plots: score against each parameter, the score/tokens and score/latency Pareto fronts, failures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in report.results.trials if t["value"] is not None]
    plots: dict[str, bytes] = {}
    names = sorted({name for t in trials for name, v in t["params"].items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names):
            rows = [t for t in trials if name in t["params"]]
            ax.scatter([t["params"][name] for t in rows], [t["value"] for t in rows],
                       c=["tab:orange" if t["baseline"] else "tab:blue" for t in rows], s=18)
            ax.set_xlabel(name)
        axes[0][0].set_ylabel("pass@1 (tuning)")
        plots["score_by_parameter"] = _png(fig, plt)
    for measure, label in (("mean_tokens", "mean tokens"), ("mean_latency_s", "mean latency (s)")):
        points = sorted((t[measure], t["value"]) for t in trials)
        if not points:
            continue
        front, best = [], -1.0
        for x, y in points:  # lowest cost first: a point is on the front when it scores above all cheaper ones
            if y > best:
                front.append((x, y))
                best = y
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.scatter(*zip(*points), s=18, color="tab:blue")
        ax.plot(*zip(*front), color="tab:red", marker="o", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("pass@1 (tuning)")
        ax.legend()
        plots[f"pareto_{measure}"] = _png(fig, plt)
    arms = list(report.failure_rates)
    types = sorted({name for rates in report.failure_rates.values() for name in rates if name != "degenerate"})
    if types:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(arms) + 1.5))
        left = [0.0] * len(arms)
        for name in types:
            widths = [report.failure_rates[arm].get(name, FailureRate(0, 1, Interval(0, 0, 0))).interval.estimate
                      for arm in arms]
            ax.barh(arms, widths, left=left, label=name)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_xlabel("share of held-out generations (a generation may have several)")
        ax.legend(fontsize=7, loc="lower right")
        plots["failures_by_configuration"] = _png(fig, plt)
    return plots


def markdown(report: Report, command: str, images: dict[str, str]) -> str:
    """The report as markdown; `images` maps plot names to file paths."""
    lines = [f"# tunelab tune: {report.results.settings.model} on {report.results.settings.suite}", ""]
    for title, header, rows in _sections(report, command):
        lines += [f"## {title}", ""]
        if header is None:
            lines += rows + [""]
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows] + [""]
    lines += [f"![{name}]({path})" for name, path in images.items()]
    return "\n".join(lines) + "\n"


_HTML = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:70em;margin:auto}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>
</head><body><h1>{{ title }}</h1>
{% for heading, header, rows in sections %}<h2>{{ heading }}</h2>
{% if header is none %}{% for row in rows %}<p>{{ row }}</p>{% endfor %}
{% else %}<table><tr>{% for cell in header %}<th>{{ cell }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}
{% endfor %}{% for name, data in images %}<img alt="{{ name }}" src="data:image/png;base64,{{ data }}">
{% endfor %}</body></html>
""")


def html_page(report: Report, command: str, plots: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page with the plots inline."""
    settings = report.results.settings
    return _HTML.render(title=f"tunelab tune: {settings.model} on {settings.suite}",
                        sections=_sections(report, command),
                        images=[(name, base64.b64encode(png).decode()) for name, png in plots.items()])


def _sections(report: Report, command: str) -> list[tuple[str, list[str] | None, list]]:
    results = report.results
    throughput = results_json(report)["throughput"]
    summary = [f"Recommendation: {report.recommended.name} ({_knob_text(report.recommended.knobs)}), because "
               f"{report.reason}.",
               f"Tuning: {len(results.tuning_tasks)} tasks x {results.settings.samples} samples, "
               f"{len(results.trials)} trials; held out: {len(results.held_out_tasks)} tasks x "
               f"{results.settings.held_out_samples} samples.",
               f"Wall time {results.wall_s / 60:.1f} min; {results.generated} generations drawn "
               f"({throughput['generations_per_s']:.2f}/s, {throughput['tokens_per_s']:.1f} tokens/s)."]
    if command:
        summary.insert(0, f"Command: {command}")
    summary[1:1] = verdict_sentences(report)
    if results.dropped_knobs:
        summary.append(f"Not searched (changed no output): {', '.join(results.dropped_knobs)}.")
    held_out = ["configuration", "pass@1 %", "winner - it (pts)", "95% CI", "verdict", "degenerate", "mean tokens"]
    types = sorted({name for rates in report.failure_rates.values() for name in rates})
    failures = [[arm] + [f"{r.count}/{r.total} [{100 * r.interval.low:.1f}-{100 * r.interval.high:.1f}%]"
                         if (r := rates.get(name)) else "0" for name in types]
                for arm, rates in report.failure_rates.items()]
    confirmed = [[arm.config.name, f"{100 * arm.pass_at_1():.1f}", f"{arm.mean_tokens():.0f}",
                  _knob_text(arm.config.knobs)] for arm in results.confirmed]
    trials = [[str(t["number"]), (t["config"] or {}).get("name", ""), f"{100 * t['value']:.1f}",
               f"{t['mean_tokens']:.0f}", _knob_text((t["config"] or {}).get("knobs", {}))]
              for t in sorted(results.trials, key=lambda t: -(t["value"] or 0))]
    return [("Summary", None, summary),
            ("Held-out comparison", held_out, held_out_rows(report)),
            ("Held-out failure rates (count/generations, Wilson 95% CI)", ["configuration"] + types, failures),
            ("Confirmation on tuning tasks", ["configuration", "pass@1 %", "mean tokens", "knobs"], confirmed),
            ("Trials (tuning tasks)", ["#", "configuration", "pass@1 %", "mean tokens", "knobs"], trials)]


def verdict_sentences(report: Report) -> list[str]:
    """One plain sentence per baseline: does the winner beat it on the held-out tasks?"""
    won = report.results.winner.config.name
    words = {"better": "beats", "worse": "is worse than", "inconclusive": "does not significantly beat"}
    return [f"The winner ({won}) is the same configuration as {c.baseline}." if c.same_config else
            f"The winner ({won}) {words[c.verdict]} {c.baseline} on held-out tasks: {_points(c.difference)}."
            for c in report.comparisons]


def _vendor_index(arms: list[ArmResult], think: bool | None) -> int:
    """Qwen's preset for the winner's thinking mode (the first Qwen preset if none matches)."""
    presets = [i for i, arm in enumerate(arms) if arm.config.name.startswith("qwen preset")]
    matching = [i for i in presets if arms[i].config.think == think]
    return (matching or presets)[0]


def _points(difference: Interval) -> str:
    return (f"{100 * difference.estimate:+.1f} points (95% CI {100 * difference.low:+.1f} to "
            f"{100 * difference.high:+.1f})")


def _knob_text(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in knobs.items()) or "the model's own settings"


def _png(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
