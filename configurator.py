"""
The configurator shared by every script (train.py, sample.py, bench.py, ...), nanoGPT style but strict.
Settings are the lower-case globals above the call (UPPER_CASE names are constants, not settings):

    python train.py config/ntp_shakespeare.py --batch_size=32 --compile=False

A script keeps its settings as plain globals and calls `configure(globals())` right after them. Config
files are plain Python executed on their own; every name they define, and every `--key=value`, must be
one of the script's globals, or the run stops with a one-line error naming the key. Values keep the type of
the default (an int may stand for a float; a default of None takes anything).
"""
import ast
import os
import sys
from ast import literal_eval


class ConfigError(SystemExit):
    """A bad config or override: exits with its one-line message (SystemExit prints it, no traceback)."""


def _set(config, key, value, source, ignore):
    if key not in config:
        if key in ignore:
            return
        raise ConfigError(f"error: unknown config key '{key}' in {source}; known keys: {', '.join(sorted(config))}")
    default = config[key]
    if default is not None and value is not None and type(value) is not type(default):
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        else:
            raise ConfigError(f"error: config key '{key}' in {source} must be {type(default).__name__}, "
                              f"got {type(value).__name__} {value!r}")
    config[key] = value


def configure(script_globals, argv=None, ignore=()):
    """Apply config files and --key=value overrides (in argv order) to the script's config globals.
    Returns the plain-data dict of the final config. `ignore`: keys accepted but unused (bench.py)."""
    argv = sys.argv[1:] if argv is None else argv
    config = {k: v for k, v in script_globals.items()
              if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str, type(None), tuple, list))}
    for arg in argv:
        if not arg.startswith('--'):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ConfigError(f"error: cannot read config file '{arg}': {e.strerror}")
            namespace = {}
            exec(compile(source, arg, 'exec'), namespace)
            for key, value in namespace.items():
                if not key.startswith('_') and not callable(value) and type(value).__name__ != 'module':
                    _set(config, key, value, arg, ignore)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq and isinstance(config.get(key), bool):  # a bare --flag turns a boolean setting on
                eq, text = '=', 'True'
            if not eq:
                raise ConfigError(f"error: override '{arg}' needs the form --key=value")
            try:
                value = literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare string such as --device=cuda
            _set(config, key, value, f"override '{arg}'", ignore)
    script_globals.update(config)
    return config


def train_keys():
    """The settings of train.py (its top-level assignments, read, not run): scripts that take a train.py
    config (bench.py, attribution.py) accept them and ignore those they do not use."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')) as f:
        tree = ast.parse(f.read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
