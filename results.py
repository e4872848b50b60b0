"""Gather a sweep (or any folder of runs) into one table: `python results.py outputs/multirun/DATE/TIME`.

Prints a markdown table of every run (overrides, status, final metrics, the paper's number and the
difference, parameters, steps, seconds), the mean ± std over seeds per configuration, and the runs
that failed or diverged with their error line. Writes DIR/results_table.{csv,json} and, with
--plot, learning curves DIR/curves_<metric>.png read from the TensorBoard events (--out: elsewhere).
A folder that cannot be written still gets its table printed, then one line (exit status 1).

`python results.py --paper DIR [DIR ...]` writes REPRODUCTIONS.md instead (in --out, default the
current folder): every recipe of conf/experiment with a paper target, the paper's figure and ours.
"""
import argparse
import sys
from pathlib import Path

from lightning_modules.report import ReportNotWritten, build_report, plot_curves, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, nargs="+",
                        help="a sweep folder, a run directory, or any folder of runs (--paper: several)")
    parser.add_argument("--group-by", action="append", default=None, metavar="KEY",
                        help="an override key (e.g. model, model.hidden_size); repeat or comma-separate for "
                             "several; default: every override that varies except seed")
    parser.add_argument("--metrics", default=None, metavar="A,B",
                        help="metric columns, e.g. test/acc,val/acc_best (default: test/* and best val/*)")
    parser.add_argument("--plot", default=None, metavar="TAG,TAG",
                        help="learning curves of these TensorBoard scalars, e.g. val/mse,train/loss")
    parser.add_argument("--out", type=Path, default=None, help="where the CSV/JSON/PNG files go (default: DIR)")
    parser.add_argument("--paper", action="store_true",
                        help="write REPRODUCTIONS.md: every paper recipe, the paper's figure and ours from the runs")
    args = parser.parse_args(argv)
    if args.paper:
        return paper_table(args.dir, args.out)
    if len(args.dir) > 1:
        parser.error("one DIR (several only with --paper)")
    args.dir = args.dir[0]
    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    group_by = [key for item in args.group_by for key in split(item)] if args.group_by else None
    try:
        text, files = build_report(args.dir, group_by=group_by, metrics=split(args.metrics) if args.metrics else None,
                                   out_dir=args.out)
        print(text, flush=True)
        write_report(files)
        if args.plot:
            for path in plot_curves(args.dir, split(args.plot), out_dir=args.out):
                print(f"plot: {path}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ReportNotWritten as err:
        print(f"error: the files could not be written: {err.folder} is not writable ({err.strerror}); choose "
              f"another folder with --out DIR", file=sys.stderr)
        return 1
    return 0


def paper_table(dirs: list[Path], out: Path | None) -> int:
    from lightning_modules.reproductions import write_reproductions

    target = (out or Path.cwd()) / "REPRODUCTIONS.md"
    try:
        text, path = write_reproductions(dirs, target)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ReportNotWritten as err:
        print(f"error: {target} could not be written: {err.folder} is not writable ({err.strerror}); choose "
              f"another folder with --out DIR", file=sys.stderr)
        return 1
    print(text, flush=True)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
