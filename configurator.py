"""
Config overrides for every script, nanoGPT's semantics without exec'ing the command line:

    python train_gen.py config/tiny.py --batch_size=4 --compile=False

Each script declares one @dataclass of defaults. A `.py` file argument is run and its top-level names
override fields; then each `--key=value` overrides one field. The type of the default is enforced and
unknown keys are an error, so a typo never silently trains the wrong model. Other bare arguments are
handed back to the script (scaling_fit.py takes CSV paths that way).

A field may be unset: declared `n_l: int | None = None`, it takes an int or None (`--n_l=None`), the type its
annotation names being enforced as a default's is.

InputError is an error the user caused and can fix (a bad file, config, checkpoint or data row). Every script calls
report_input_errors() first: an InputError that reaches the top is printed as one line, `error: <file>[:line]:
<what> (<what to do>)`, and the script exits 2; any other exception is a bug and keeps its traceback.
"""
import ast
import dataclasses
import os
import runpy
import sys
import typing


class InputError(ValueError):
    """A bad input, named with its file (and line): the scripts print it in one line and exit 2."""


def report_input_errors():
    def one_line(kind, error, traceback):
        if isinstance(error, InputError):
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2)  # raised in the hook, it sets the exit status (and atexit handlers still run)
        sys.__excepthook__(kind, error, traceback)
    sys.excepthook = one_line


def _coerce(key, value, default):
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if isinstance(value, str):
            if value not in ("True", "False"):
                raise InputError(f"--{key} must be True or False, got {value!r}")
            return value == "True"
        if not isinstance(value, bool):
            raise InputError(f"{key} must be a bool, got {value!r}")
        return value
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise InputError(f"--{key}={value!r} is not a valid {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise InputError(f"{key} must be {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_config(config, argv):
    """Returns (config with overrides applied, list of positional arguments)."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    overrides, positional = {}, []
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise InputError(f"expected --key=value, got {arg!r}")
            overrides[key] = value
        elif arg.endswith(".py"):
            if not os.path.isfile(arg):
                raise InputError(f"{arg}: config file not found (give the path of a file in config/, e.g. "
                                 f"config/tiny.py)")
            names = runpy.run_path(arg)
            for key, value in names.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in fields:
                    raise InputError(f"{arg}: unknown config key {key!r}")
                overrides[key] = value
        else:
            positional.append(arg)
    for key, value in overrides.items():
        if key not in fields:
            raise InputError(f"unknown config key {key!r}; known: {', '.join(sorted(fields))}")
        kinds = typing.get_args(hints[key])
        if type(None) in kinds:  # `kind | None`: None unsets it, anything else must be a kind
            kind = next(t for t in kinds if t is not type(None))
            value = None if value is None or value == "None" else _coerce(key, value, kind())
        else:
            value = _coerce(key, value, getattr(config, key))
        setattr(config, key, value)
    return config, positional
