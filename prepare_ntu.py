"""Convert the NTU RGB+D skeletons into the HDF5 file that `task=ntu_cs` (and ntu_cv, ntu120_*) read.

    python prepare_ntu.py raw=nturgbd_skeletons_s001_to_s017.zip out=data/ntu/ntu60.h5
    python prepare_ntu.py raw=PATH/nturgb+d_skeletons exclude=NTU_RGBD_samples_with_missing_skeletons.txt
    python prepare_ntu.py --help

The logic is in datamodules/ntu_convert.py (HDF5 layout) and datamodules/ntu_skeleton.py (parsing, body selection); see README.md.
"""
import logging
import sys

from datamodules.ntu_convert import EXPECTED_RAW, ConvertError, convert, summary_table

USAGE = """usage: python prepare_ntu.py raw=PATH[,PATH...] out=data/ntu/ntu60.h5 [key=value ...]
  raw=PATH          folder of .skeleton files, or the downloaded zip (comma-separated for several)
  out=FILE          HDF5 file to write (default data/ntu/ntu60.h5)
  workers=N         parsing processes (default: one per CPU)
  exclude=FILE      sample names to leave out, one per line (NTU's 302 samples with missing skeletons)
  dtype=float32     or float16 (half the size)
  compression=none  contiguous, memory-mapped by the loader (fastest); gzip or lzf: chunked, smaller
  min_body_frames=11  body IDs tracked in fewer frames are noise
  overwrite=false   true: replace an existing out file
  progress=true     false: no progress bar"""
OPTIONS = ("raw", "out", "workers", "exclude", "dtype", "compression", "min_body_frames", "overwrite", "progress")


def _parse_bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConvertError(f"{key} must be true or false, got {value!r}")


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConvertError(f"{key} must be an integer, got {value!r}") from None


def parse_args(argv: list[str]) -> dict:
    """``["raw=PATH", "out=FILE", ...]`` -> keyword arguments of :func:`convert` (ConvertError if bad)."""
    options: dict[str, str] = {}
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals or key not in OPTIONS:
            raise ConvertError(f"unknown argument {argument!r}; use key=value with key one of {OPTIONS}")
        options[key] = value
    if not options.get("raw"):
        raise ConvertError(f"raw=PATH is required: {EXPECTED_RAW}")
    kwargs: dict = {"raw": [p for p in options["raw"].split(",") if p], "out": options.get("out", "data/ntu/ntu60.h5")}
    if "workers" in options:
        kwargs["workers"] = _parse_int("workers", options["workers"])
    if "min_body_frames" in options:
        kwargs["min_body_frames"] = _parse_int("min_body_frames", options["min_body_frames"])
    for key in ("overwrite", "progress"):
        if key in options:
            kwargs[key] = _parse_bool(key, options[key])
    for key in ("exclude", "dtype", "compression"):
        if key in options:
            kwargs[key] = options[key] or None
    return kwargs


def main(argv: list[str]) -> int:
    """The ``prepare_ntu.py`` command: convert, print the summary table; 0 on success, 2 on bad arguments."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kwargs = parse_args(argv)
        manifest = convert(**kwargs)
    except (ConvertError, ValueError) as error:
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
