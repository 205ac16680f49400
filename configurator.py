"""
Poor man's configurator, shared by train.py and sample.py (after nanoGPT's configurator.py).

A script declares its settings as plain module globals, then calls

    config = configure(globals(), keys)

which applies, in order:
  * config files given as bare arguments:  python train.py config/train_shakespeare_char.py
    (each file is executed, in the order given; the names it defines override the defaults)
  * --key=value overrides:                 python train.py --batch_size=32 --compile=False

Precedence: defaults < config files < --key=value flags. Flags always win over config files, wherever they
stand on the command line (`--batch_size=8 config/x.py` runs with batch_size 8 even if config/x.py sets it);
among files, and among flags, the later one wins.

Values are parsed with ast.literal_eval (so 3e-4, (0.0, 0.1), None, True/False work); a value that
is not a Python literal is kept as a string when the default is a string (--dataset=imdb).
A config file is Python, executed as it is read (also for --help): run only files you trust.
Unknown keys, values of the wrong type, a flag without `=value` and a config file that cannot be read, does
not parse or raises stop the script with one line, `error: ...` (exit status 2).
--help (or -h) prints every key with its value (after any config file / overrides) and exits 0.
"""
import ast
import difflib
import os
import sys
import traceback

_SIMPLE = (bool, int, float, str, tuple, list, type(None))


def config_keys(g):
    """The overridable settings of a script: public globals holding plain values."""
    return [k for k, v in g.items() if not k.startswith('_') and isinstance(v, _SIMPLE)]


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _unknown(k, where, valid):
    near = difflib.get_close_matches(k, valid, n=1)
    _fail(f"unknown key {k!r} {where}" + (f": did you mean {near[0]!r}?" if near else '') +
          " (--help lists every key)")


def _coerce(key, value, default, origin):
    """Check `value` against the type of `default`; return the (possibly converted) value."""
    if default is None or value is None:
        return value  # None defaults accept any literal; None is accepted everywhere
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        _fail(f"{origin}: {key} expects True or False, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # --max_iters=1e4
        _fail(f"{origin}: {key} expects an int, got {value!r} ({type(value).__name__})")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(f"{origin}: {key} expects a float, got {value!r} ({type(value).__name__})")
    if isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
        _fail(f"{origin}: {key} expects a {type(default).__name__}, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        _fail(f"{origin}: {key} expects a string, got {value!r} ({type(value).__name__})")
    return value


def _parse_value(raw, default):
    if isinstance(default, bool) and raw.lower() in ('true', 'false'):
        return raw.lower() == 'true'
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a plain string (--dataset=imdb); a type error for non-string keys
    if isinstance(default, str) and not isinstance(value, str):
        return raw  # --out_dir=2024 stays the string '2024'
    return value


def _usage(g, keys, doc):
    lines = []
    if doc:
        lines.append(doc.strip())
        lines.append('')
    lines.append('usage: python %s [config_file.py ...] [--key=value ...]' % sys.argv[0])
    lines.append('A config file is Python, executed as it is read (also with --help): run only files you trust. '
                 'Flags win over files.')
    lines.append('')
    lines.append('keys (current values):')
    width = max(len(k) for k in keys)
    for k in keys:
        lines.append(f"  --{k:<{width}} = {g[k]!r}")
    return '\n'.join(lines)


def _exec_config(path):
    """Execute a config file; return the plain values it defines (not modules, functions or _private names)."""
    try:
        with open(path) as f:
            src = f.read()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"cannot read config file {path!r}: {e}")
    try:
        code = compile(src, path, 'exec')
    except SyntaxError as e:
        _fail(f"config file {path}, line {e.lineno}: syntax error: {e.msg}")
    ns = {}
    try:
        exec(code, ns)
    except Exception as e:  # noqa: BLE001 - whatever the file raises, one line naming the file and line
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), '?')
        _fail(f"config file {path}, line {line}: {type(e).__name__}: {' '.join(str(e).split())}")
    return {k: v for k, v in ns.items() if not k.startswith('_') and isinstance(v, _SIMPLE)}


def _print_help(text):
    """Print --help's text; a reader that stops early (`| head`) ends it quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def configure(g, keys=None, argv=None, doc=None, origins=None):
    """Apply config files and --key=value overrides to the globals dict `g`.

    keys: names that may be overridden (default: config_keys(g)). origins: a dict, if given, filled with
    {key: where its value came from}: the config file's path, or the flag (`--key=value`). Returns
    {key: final value}.
    """
    keys = list(keys) if keys is not None else config_keys(g)
    argv = sys.argv[1:] if argv is None else argv
    valid = set(keys)
    origins = {} if origins is None else origins
    want_help = any(a in ('-h', '--help') for a in argv)
    args = [a for a in argv if a not in ('-h', '--help')]
    flags = []
    for i, arg in enumerate(args):  # every flag's syntax first: `--batch_size 8` must not run a file named 8
        if not arg.startswith('--'):
            continue
        body = arg[2:]
        if '=' not in body:
            nxt = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith('--') else None
            _fail(f"{arg} needs a value: write {arg}={nxt if nxt is not None else '<value>'} "
                  f"(flags are --key=value, without a space)")
        k, raw = body.split('=', 1)
        k = k.replace('-', '_') if k not in valid else k
        if k not in valid:
            _unknown(k, f"(from {arg!r})", keys)
        flags.append((arg, k, raw))
    for arg in [a for a in args if not a.startswith('--')]:  # config files first, then flags (which win)
        for k, v in _exec_config(arg).items():
            if k not in valid:
                _unknown(k, f"in config file {arg}", keys)
            g[k] = _coerce(k, v, g[k], arg)
            origins[k] = arg
    for arg, k, raw in flags:
        g[k] = _coerce(k, _parse_value(raw, g[k]), g[k], arg)
        origins[k] = arg
    if want_help:  # after the overrides, so that `script.py config/x.py --help` shows that config
        _print_help(_usage(g, keys, doc))
        sys.exit(0)
    return {k: g[k] for k in keys}
