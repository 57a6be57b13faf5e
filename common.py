"""What every script shares: settings, one-line errors, atomic files, models, devices."""
import ast
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, nullcontext, suppress

import torch

from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))  # config files' paths start here
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
DTYPE = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'


class UserError(SystemExit):
    """Bad input: exit 1 with one line "error: ...", printed by rank 0 alone."""

    def __init__(self, message):
        if int(os.environ.get('RANK', '0')) != 0:
            time.sleep(2)  # let rank 0 print before torchrun stops it
            super().__init__(1)
        else:
            super().__init__(f"error: {message}")


def setting_names(script):
    """Another script's settings, read from its source without importing it."""
    with open(os.path.join(REPO, script)) as f:
        tree = ast.parse(f.read())
    return {node.target.id for node in tree.body if isinstance(node, ast.AnnAssign)}


def check_setting(key, value, domain, source):
    """value if it lies in its domain, else a one-line error. Domains: 'bool', 'str', 'int' or
    'float' with an optional comparison ('int >= 1', '0 <= float < 1'), choices ('ntp|cocomix'),
    an existing 'file' or 'dir' ('file?': or ''), 'out' (a folder to write: not a file), 'device'
    (cpu, mps, an available cuda:N)."""
    def refuse(want):
        return UserError(f"{source}: {key} must be {want}, not {value!r}")
    kind = domain.rstrip('?')
    if '|' in domain:
        if value not in domain.split('|'):
            raise refuse(f"one of {domain.replace('|', ', ')}")
    elif kind in ('file', 'dir'):
        exists = os.path.isfile if kind == 'file' else os.path.isdir
        if not isinstance(value, str) or not (exists(value) or value == '' and kind != domain):
            raise refuse(f"an existing {'folder' if kind == 'dir' else 'file'}")
    elif kind == 'out':
        if not isinstance(value, str) or os.path.isfile(value) or not (value or domain == 'out?'):
            raise refuse("a folder to write into, not a file")
    elif domain == 'device':
        name, _, index = str(value).partition(':')
        if name not in ('cpu', 'cuda', 'mps') or (index and not index.isdigit()):
            raise refuse("cpu, cuda, cuda:N or mps")
        if name == 'cuda' and not torch.cuda.is_available():
            raise refuse("cpu (this torch sees no CUDA GPU: a CPU-only build, or no driver)")
        if index and int(index) >= torch.cuda.device_count():
            raise refuse(f"a GPU index below {torch.cuda.device_count()}")
    else:
        kind = next(w for w in ('bool', 'str', 'int', 'float') if w in domain.split())
        if kind == 'float' and type(value) is int:
            value = float(value)
        a = 'an' if kind == 'int' else 'a'
        if type(value).__name__ != kind:
            raise refuse(f"{a} {kind}")
        if domain != kind and not eval(domain.replace(kind, 'x'), {'inf': math.inf}, {'x': value}):
            raise refuse(f"{a} {kind} with {domain.replace(kind, key)}")
    return value


def configure(script_globals, argv=None, ignore=(), given=None):
    """Apply config files and --key=value overrides, in order, to the script's annotated globals,
    check each against its domain; return them. ignore: keys accepted but unused; given: receives
    the keys set explicitly."""
    domains = script_globals.get('__annotations__', {})
    config = {k: script_globals[k] for k in domains}
    sources = dict.fromkeys(config, 'the default')
    given = set() if given is None else given

    def put(key, value, source):
        if key not in config:
            if key in ignore:
                return
            raise UserError(f"unknown config key '{key}' in {source}; "
                            f"known keys: {', '.join(sorted(config))}")
        config[key], sources[key] = value, source
        given.add(key)
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith('--'):
            try:
                source = open(arg).read()
            except (OSError, ValueError) as e:  # not UTF-8 too
                raise UserError(f"cannot read config file '{arg}': {getattr(e, 'strerror', e)}")
            namespace, cwd = {}, os.getcwd()
            try:  # from the repository, so that a config file may exec another: config/x.py
                os.chdir(REPO)
                exec(compile(source, os.path.join(cwd, arg), 'exec'), namespace)
            except SyntaxError as e:
                raise UserError(f"config file {arg}, line {e.lineno}: {e.msg}; fix it there")
            except Exception as e:
                raise UserError(f"config file {arg} failed: {type(e).__name__}: {e}")
            finally:
                os.chdir(cwd)
            for key, value in namespace.items():
                if not (key.startswith('_') or callable(value) or type(value).__name__ == 'module'):
                    put(key, value, f"config file {arg}")
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq and domains.get(key) != 'bool':
                raise UserError(f"override '{arg}' needs the form --key=value")
            try:
                value = ast.literal_eval(text) if eq else True  # a bare --flag turns a boolean on
            except (SyntaxError, ValueError):
                value = text  # a bare string: --device=cuda
            textual = not {'bool', 'int', 'float'} & set(domains.get(key, 'bool').split())
            if textual and eq and not isinstance(value, str):
                value = text  # --out_dir=2024 names a folder
            put(key, value, f"override '{arg}'")
    for key, domain in domains.items():  # every value, before any work
        config[key] = check_setting(key, config[key], domain, sources[key])
    script_globals.update(config)
    return config


@contextmanager
def atomic_path(path):
    """with atomic_path(path) as tmp: write tmp; it becomes `path` only if the block succeeds.
    tmp is unique to the call: two processes writing one path never share it."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())  # on disk before the rename
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(checkpoint, out_dir, name='ckpt.pt'):
    with atomic_path(os.path.join(out_dir, name)) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(out_dir, device, name='ckpt.pt'):
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read the checkpoint {path} ({first_line(e)}); it is truncated "
                        "or not a checkpoint")


def first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def load_model(spec, device='cpu', dropout=0.0, **extra):
    """'gpt2*', a GPT-2 folder or a train.py out_dir -> (model in eval mode, checkpoint or None).
    extra: CoCoMix or pause settings for a pretrained GPT-2."""
    if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, 'config.json')):
        checkpoint = load_checkpoint(spec, device)
        fields = GPTConfig.__dataclass_fields__
        args = {k: v for k, v in checkpoint['model_args'].items() if k in fields}
        model = GPT(GPTConfig(**dict(args, dropout=dropout)))
        model.load_state_dict(checkpoint['model'])
    elif spec.startswith('gpt2') or os.path.isdir(spec):
        folder = spec if os.path.isdir(spec) else hub_folder(spec)
        checkpoint, model = None, GPT.from_pretrained(folder, dropout, **extra)
    else:
        raise UserError(f"'{spec}' is neither gpt2* nor a folder with ckpt.pt or config.json")
    return model.to(device).eval(), checkpoint


def pretrained_shape(spec):
    """A pretrained GPT-2's architecture, without its weights."""
    shapes = {'gpt2': (12, 12, 768, 1024), 'gpt2-medium': (24, 16, 1024, 1024),
              'gpt2-large': (36, 20, 1280, 1024), 'gpt2-xl': (48, 25, 1600, 1024)}
    if os.path.isdir(spec):
        with open(os.path.join(spec, 'config.json')) as f:
            hf = json.load(f)
        shapes[spec] = hf['n_layer'], hf['n_head'], hf['n_embd'], hf['n_positions']
    if spec not in shapes:
        raise UserError(f"unknown model '{spec}'; use one of {', '.join(shapes)} or a folder")
    return dict(zip(('n_layer', 'n_head', 'n_embd', 'block_size'), shapes[spec]), bias=True)


def check_hub(what, fix):
    """Fail at once, not after minutes of retries, when the hub is unreachable. urllib uses
    HTTPS_PROXY as the hub client does; any HTTP answer means the hub is there."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method='HEAD'), timeout=5)
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as e:
        raise UserError(f"cannot reach the Hugging Face hub for {what} ({e}); {fix}")


def hub_folder(name):
    from huggingface_hub import snapshot_download
    patterns = ['config.json', 'model.safetensors']
    with suppress(Exception):  # not cached yet
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    fix = (f"on a machine with internet run `hf download {name} config.json "
           f"model.safetensors --local-dir DIR`, copy DIR here, pass its path instead of '{name}'")
    check_hub(f"'{name}'", fix)
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as e:
        raise UserError(f"cannot download '{name}' from the hub ({first_line(e)}); {fix}")


def fingerprint(tensors):
    """A short hash of a module's or state dict's tensors: tells teachers and SAEs apart."""
    h = hashlib.sha256()
    items = tensors.state_dict() if isinstance(tensors, torch.nn.Module) else tensors
    for k in sorted(items):
        if torch.is_tensor(items[k]):
            h.update(k.encode())
            h.update(items[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_tokenizers(meta, name, other, other_name):
    """Refuse data and a model that tokenize differently (old checkpoints: by vocabulary)."""
    if 'tokenizer' not in other:
        if meta['vocab_size'] > other['vocab_size']:
            raise UserError(f"{name} has {meta['vocab_size']} token ids but {other_name} only "
                            f"{other['vocab_size']}: they use different tokenizers")
        return
    chars = lambda m: tuple(m['chars']) if m['tokenizer'] == 'char' else None
    if (meta['tokenizer'], chars(meta)) != (other['tokenizer'], chars(other)):
        say = lambda m: f"'{m['tokenizer']}'" if chars(m) is None else 'a different character set'
        raise UserError(f"{name} is tokenized with {say(meta)} but {other_name} with {say(other)}; "
                        "prepare the data with the model's tokenizer (prepare.py --tokenizer=...)")


def load_teacher(spec, device, data_meta, data_dir):
    """A frozen teacher in eval mode, refused if it tokenizes the data differently."""
    model, checkpoint = load_model(spec, device)
    model.requires_grad_(False)
    tokens = {'tokenizer': 'gpt2'} if checkpoint is None else \
        checkpoint.get('data_meta', {'vocab_size': model.config.vocab_size})
    check_tokenizers(data_meta, f"the data in {data_dir}", tokens, f"the teacher {spec}")
    return model


def autocast(device, dtype):
    return nullcontext() if dtype == 'float32' else \
        torch.autocast('cuda' if 'cuda' in str(device) else 'cpu', dtype=getattr(torch, dtype))


def setup_distributed(device):
    """Under torchrun, join the process group and take a GPU -> (rank, world, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, device
    torch.distributed.init_process_group(backend='nccl' if 'cuda' in device else 'gloo')
    if 'cuda' in device:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device


def peak_flops(device, dtype):
    """Datasheet peak dense FLOP/s, for MFU; None where unknown."""
    if 'cuda' in str(device):  # names as 'NVIDIA A100-SXM4-80GB': whole words, an L40S is no L4
        words = re.split(r'[\s-]+', torch.cuda.get_device_name(device))
        bf16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12,
                'A10': 125e12, '4090': 165e12}
        for key, flops in bf16.items():
            if key in words:
                if dtype != 'float32':
                    return flops
                # float32 matmuls run as TF32 (half the bf16 rate) where allowed, else ~1/16
                return flops / (2 if torch.backends.cuda.matmul.allow_tf32 else 16)
    return None
