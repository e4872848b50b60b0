"""Gather a sweep (or any folder of runs) into one table: `python results.py dir=outputs/multirun/DATE/TIME`.

Prints a markdown table of every run (overrides, status, final metrics, the paper's number and the
difference, parameters, steps, seconds), the mean ± std over seeds per configuration, and the runs
that failed or diverged with their error line. Writes DIR/results_table.{csv,json} and, with
plot=TAG,TAG, learning curves DIR/curves_<tag>.png read from the TensorBoard events (out=: elsewhere).
A folder that cannot be written still gets its table printed, then one line (exit status 1).

`python results.py paper=true dir=DIR[,DIR...]` writes REPRODUCTIONS.md instead (in out=, default the
current folder): every recipe of conf/experiment with a paper target, the paper's figure and ours.

key=value arguments as every entry point (tools/cli.py); the tables are built by
tools/runs_table.py and tools/reproductions.py.
"""
import sys
from pathlib import Path

from tools.cli import CommandLineError, Option, as_bool, as_optional_str, help_text, parse, wants_help

COMMAND = "results.py"
SUMMARY = "One table of the runs under a folder (a sweep, a run, any tree of runs), or REPRODUCTIONS.md."
OPTIONS = (
    Option("dir", None, "a sweep folder, a run directory or any folder of runs (paper=true: several, comma-separated)",
           required=True, metavar="DIR[,DIR...]"),
    Option("group_by", None, "override keys to group by, e.g. model,model.hidden_size (default: every override "
                             "that varies except seed)", as_optional_str, metavar="KEY[,KEY...]"),
    Option("metrics", None, "metric columns, e.g. test/acc,val/acc_best (default: test/* and best val/*)",
           as_optional_str, metavar="A[,B...]"),
    Option("plot", None, "learning curves of these TensorBoard scalars, e.g. val/mse,train/loss", as_optional_str,
           metavar="TAG[,TAG...]"),
    Option("out", None, "where the CSV/JSON/PNG files (or REPRODUCTIONS.md) go (default: DIR; paper=true: the "
                        "current folder)", as_optional_str, metavar="DIR"),
    Option("paper", False, "true: write REPRODUCTIONS.md, every paper recipe, the paper's figure and ours", as_bool),
)


def items(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None -> []."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    """The ``results.py`` command: 0 on success, 1 when the files cannot be written, 2 on bad arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or wants_help(argv):
        print(help_text(COMMAND, SUMMARY, OPTIONS))
        return 0 if argv else 2
    from tools.runs_table import ReportNotWritten, build_report, plot_curves, write_report

    try:
        args = parse(argv, OPTIONS, COMMAND, bare_means="dir")
        dirs = [Path(folder) for folder in items(args["dir"])]
        out = Path(args["out"]) if args["out"] else None
        if args["paper"]:
            return paper_table(dirs, out)
        if len(dirs) != 1:
            raise CommandLineError(f"dir={args['dir']}: one folder (several only with paper=true)")
        target = dirs[0]
        text, files = build_report(target, group_by=items(args["group_by"]) or None,
                                   metrics=items(args["metrics"]) or None, out_dir=out)
        print(text, flush=True)
        write_report(files)
        if args["plot"]:
            for path in plot_curves(target, items(args["plot"]), out_dir=out):
                print(f"plot: {path}")
    except ValueError as err:  # CommandLineError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ReportNotWritten as err:
        return not_written("the files", err)
    return 0


def not_written(what: str, err) -> int:
    """One line for a :class:`~tools.runs_table.ReportNotWritten`; exit status 1."""
    print(f"error: {what} could not be written: {err.folder} is not writable ({err.strerror}); choose another "
          f"folder with out=DIR", file=sys.stderr)
    return 1


def paper_table(dirs: list[Path], out: Path | None) -> int:
    """``paper=true``: write REPRODUCTIONS.md into ``out`` (default: the current folder)."""
    from tools.runs_table import ReportNotWritten
    from tools.reproductions import write_reproductions

    target = (out or Path.cwd()) / "REPRODUCTIONS.md"
    try:
        text, path = write_reproductions(dirs, target)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ReportNotWritten as err:
        return not_written(str(target), err)
    print(text, flush=True)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
