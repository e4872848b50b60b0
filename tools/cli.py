"""The command-line convention of every entry point: ``key=value`` arguments, as Hydra's.

train.py and eval.py take Hydra's overrides (``python train.py model=lstm trainer=cpu``, ``--help``);
the small entry points (generate.py, prepare_ntu.py, results.py) take the same shape through :func:`parse`:

* every argument is ``key=value``; a value is taken as written (``ckpt_path=best.ckpt`` keeps its
  dot; OmegaConf's command-line parser would read it as a nested key) and converted by its option;
* ``-h``, ``--help`` or ``help`` prints the usage and every option with its default;
* an unknown key, a key given twice, a bare argument or a bad value is one line that names it and
  lists the accepted keys (:class:`CommandLineError`; the entry point prints ``error: ...``, exit 2).

Standard library only: prepare_ntu.py's ``--help`` must not wait for torch or Lightning to import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

HELP_FLAGS = ("-h", "--help", "help")


class CommandLineError(ValueError):
    """A bad command line, as one line (the entry point exits with status 2)."""


def as_bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise CommandLineError(f"{key} must be true or false, got {value!r}")


def as_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CommandLineError(f"{key} must be an integer, got {value!r}") from None


def as_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise CommandLineError(f"{key} must be a number, got {value!r}") from None


def as_str(key: str, value: str) -> str:
    return value


def as_optional_str(key: str, value: str) -> str | None:
    """The value, or None for ``key=`` / ``key=null`` (the option's "not given")."""
    return None if value in ("", "null", "none", "None") else value


@dataclass(frozen=True)
class Option:
    """One ``key=value`` argument: its default, its converter (``convert(key, text) -> value``, raising
    CommandLineError) and the line --help prints."""

    key: str
    default: Any
    help: str
    convert: Callable[[str, str], Any] = as_str
    required: bool = False
    metavar: str = ""

    def usage(self) -> str:
        shown = self.metavar or ("" if self.default is None else str(self.default).lower()
                                 if isinstance(self.default, bool) else str(self.default))
        return f"{self.key}={shown}"


def accepted(options: Sequence[Option]) -> str:
    return ", ".join(option.key for option in options)


def unknown_key(argument: str, accepted_keys: str, command: str) -> CommandLineError:
    """The one line for an argument a command does not take (shared with eval.py's override check)."""
    return CommandLineError(f"unknown argument {argument!r}; {command} accepts {accepted_keys} "
                            f"(python {command} --help)")


def help_text(command: str, summary: str, options: Sequence[Option]) -> str:
    """``usage: python COMMAND key=value ...``, the summary, and one line per option."""
    required = " ".join(option.usage() for option in options if option.required)
    width = max(len(option.usage()) for option in options) + 2
    lines = [f"usage: python {command} {required} [key=value ...]".replace("  ", " "), summary.strip(), "", "options:"]
    lines += [f"  {option.usage():<{width}}{option.help}" for option in options]
    return "\n".join(line.rstrip() for line in lines)


def parse(argv: Sequence[str], options: Sequence[Option], command: str, bare_means: str | None = None) -> dict:
    """``["key=value", ...]`` -> {key: converted value} with every option's default filled in.

    ``bare_means`` names the option a bare argument was probably meant for (generate.py: a
    checkpoint path), so the error can show the full corrected argument. Raises CommandLineError.
    """
    by_key = {option.key: option for option in options}
    given: dict[str, str] = {}
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals:
            flag = argument.lstrip("-").replace("-", "_")  # an argparse habit: --group-by -> group_by=...
            hint = (f"did you mean {flag}=...? " if argument.startswith("-") and flag in by_key else
                    f"did you mean {bare_means}={argument}? " if bare_means else "")
            raise CommandLineError(f"{argument!r} is not key=value; {hint}{command} accepts {accepted(options)} "
                                   f"(python {command} --help)")
        if key not in by_key:
            raise unknown_key(argument, accepted(options), command)
        if key in given:
            raise CommandLineError(f"{key} is given twice ({key}={given[key]} and {argument}); give it once")
        given[key] = value
    missing = [option for option in options if option.required and not given.get(option.key)]
    if missing:
        first = missing[0]
        raise CommandLineError(f"{first.key}={first.metavar or 'VALUE'} is required: {first.help} "
                               f"(python {command} --help)")
    return {option.key: option.convert(option.key, given[option.key]) if option.key in given else option.default
            for option in options}


def wants_help(argv: Sequence[str]) -> bool:
    return any(argument in HELP_FLAGS for argument in argv)


__all__ = ["CommandLineError", "HELP_FLAGS", "Option", "accepted", "as_bool", "as_float", "as_int",
           "as_optional_str", "as_str", "help_text", "parse", "unknown_key", "wants_help"]
