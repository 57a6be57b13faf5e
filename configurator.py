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
from contextlib import contextmanager
import socket
import sys
import tempfile
import time
import urllib.parse
from ast import literal_eval


class UserError(SystemExit):
    """Bad input: exit with status 1 and one line, "error: <what is wrong and how to fix it>", no traceback.
    Under torchrun every process meets the same bad input, so only rank 0 prints it; the others wait a moment
    (so that torchrun does not stop rank 0 before it has printed) and exit quietly."""

    def __init__(self, message):
        if int(os.environ.get('RANK', '0')) != 0:
            time.sleep(2)
            super().__init__(1)
        else:
            super().__init__(f"error: {message}")


ConfigError = UserError


def check_hub(what, fix):
    """Fail at once, in one line, when the Hugging Face hub cannot be reached, instead of after minutes of retries
    and screens of tracebacks. With HF_HUB_OFFLINE=1 the libraries read their caches: nothing to check."""
    from huggingface_hub import constants  # installed with datasets
    if constants.HF_HUB_OFFLINE:
        return
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face hub for {what} ({e}); {fix}")


@contextmanager
def atomic_path(path):
    """with atomic_path(path) as tmp: write tmp. The file appears at `path` only once the block succeeded, through
    a rename: a crash mid-write leaves the previous file intact. The temporary name is this process's own, so a
    file left by a killed run is never in the way (and never taken for a finished one)."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _set(config, key, value, source, ignore):
    if key not in config:
        if key in ignore:
            return
        raise ConfigError(f"unknown config key '{key}' in {source}; known keys: {', '.join(sorted(config))}")
    default = config[key]
    if default is not None and value is not None and type(value) is not type(default):
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        else:
            raise ConfigError(f"config key '{key}' in {source} must be {type(default).__name__}, "
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
                raise ConfigError(f"cannot read config file '{arg}': {e.strerror}")
            namespace = {}
            try:
                exec(compile(source, arg, 'exec'), namespace)
            except SyntaxError as e:
                raise ConfigError(f"config file {arg}, line {e.lineno}: {e.msg}; fix the Python there")
            except Exception as e:  # a config file is plain Python: report where it broke, in one line
                raise ConfigError(f"config file {arg} failed: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if not key.startswith('_') and not callable(value) and type(value).__name__ != 'module':
                    _set(config, key, value, arg, ignore)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq and isinstance(config.get(key), bool):  # a bare --flag turns a boolean setting on
                eq, text = '=', 'True'
            if not eq:
                raise ConfigError(f"override '{arg}' needs the form --key=value")
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
