"""Convert the NTU RGB+D skeletons into the HDF5 file that `task=ntu_cs` (and ntu_cv, ntu120_*) read.

    python prepare_ntu.py raw=nturgbd_skeletons_s001_to_s017.zip out=data/ntu/ntu60.h5
    python prepare_ntu.py raw=PATH/nturgb+d_skeletons exclude=NTU_RGBD_samples_with_missing_skeletons.txt
    python prepare_ntu.py --help

key=value arguments as every entry point (tools/cli.py). The logic is in
datamodules/ntu_convert.py (the conversion), datamodules/ntu_hdf5.py (the HDF5 layout) and datamodules/ntu_skeleton.py
(parsing, body selection); see README.md.
"""
import logging
import sys

from datamodules.ntu_convert import EXPECTED_RAW, ConvertError, convert, summary_table
from tools.cli import CommandLineError, Option, as_bool, as_int, as_optional_str, help_text, parse, \
    wants_help

COMMAND = "prepare_ntu.py"
SUMMARY = "Convert NTU RGB+D .skeleton files (a folder or the downloaded zips) into one HDF5 file."
OPTIONS = (
    Option("raw", None, f"{EXPECTED_RAW}, comma-separated for several", required=True, metavar="PATH[,PATH...]"),
    Option("out", "data/ntu/ntu60.h5", "HDF5 file to write"),
    Option("workers", None, "parsing processes (default: one per CPU)", as_int, metavar="N"),
    Option("exclude", None, "sample names to leave out, one per line (NTU's 302 samples with missing skeletons)",
           as_optional_str, metavar="FILE"),
    Option("dtype", "float32", "or float16 (half the size)"),
    Option("compression", "none", "contiguous, memory-mapped by the loader (fastest); gzip or lzf: chunked, smaller"),
    Option("min_body_frames", 11, "body IDs tracked in fewer frames are noise", as_int),
    Option("overwrite", False, "true: replace an existing out file", as_bool),
    Option("progress", True, "false: no progress bar", as_bool),
)


def parse_args(argv: list[str]) -> dict:
    """``["raw=PATH", "out=FILE", ...]`` -> keyword arguments of :func:`convert` (CommandLineError if bad)."""
    kwargs = parse(argv, OPTIONS, COMMAND, bare_means="raw")
    kwargs["raw"] = [path for path in kwargs["raw"].split(",") if path]
    return kwargs


def main(argv: list[str]) -> int:
    """The ``prepare_ntu.py`` command: convert, print the summary table; 0 on success, 2 on bad arguments."""
    if not argv or wants_help(argv):
        print(help_text(COMMAND, SUMMARY, OPTIONS))
        return 0 if argv else 2
    try:
        kwargs = parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        manifest = convert(**kwargs)
    except (CommandLineError, ConvertError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written (the partial file was removed); run the same command again",
              file=sys.stderr)
        return 130
    print(summary_table(manifest, kwargs["out"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
