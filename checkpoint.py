"""
The one place mipt checkpoints are read and written (train.py, sample.py, results/phase.py).

    import checkpoint
    checkpoint.save(path, {'format': checkpoint.CKPT_FORMAT, 'model': ..., 'model_args': ..., ...})
    ck = checkpoint.load(path)                  # a dict with ck['format'] == CKPT_FORMAT, else exit 1
    model = checkpoint.build_model(ck, device)  # MIPT(MIPTConfig(**ck['model_args'])) + ck['peer'] + weights
    model = checkpoint.build_model(ck, device, path, how={'cache_impl': 'torch'})  # this run's "how" fields

A checkpoint is a plain dict read with torch.load(weights_only=True): tensors, numbers, strings, lists,
dicts, never pickled code. Writes go to path + '.tmp' and are renamed, so a crash or a full disk never
leaves a half-written checkpoint under the real name. Every failure here is one line on stderr,
`error: ...`, and exit status 1 (die); with DEBUG = True (train.py --debug=True) a failure that comes from
an exception re-raises it, traceback and all.
"""
import errno
import os
import re
import sys
import warnings

import torch

CKPT_FORMAT = 'mipt-ckpt-1'
DEBUG = False


def die(msg, code=1):
    """Print `error: msg` to stderr and exit with `code` (2: a configuration error, 1: anything else).
    With DEBUG set and an exception being handled, re-raise that exception instead."""
    if DEBUG and sys.exc_info()[1] is not None:
        raise  # noqa: PLE0704 - called from an except block: the original exception and its traceback
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def _reason(e):
    """One line for an exception from torch.load / torch.save, without torch's advice to load unsafely."""
    text = str(e).replace('\x1b[1m', '').replace('\x1b[0m', '')
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), '')
    line = re.split(r'\.\s|Re-running|weights_only', line)[0].strip(' .')
    return f"{type(e).__name__}: {line[:200]}" if line else type(e).__name__


def save(path, obj):
    """torch.save(obj) to path atomically (path.tmp, then os.replace); a failed write removes the .tmp and
    dies with one line ('disk full' when the disk is)."""
    tmp = path + '.tmp'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        text = str(e)
        if getattr(e, 'errno', None) == errno.ENOSPC or 'enforce fail at inline_container' in text \
                or 'file write failed' in text:
            why = 'disk full (no space left on the device): free some space, or write to another --out_dir'
        elif isinstance(e, OSError) and e.errno:
            why = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
        else:
            why = _reason(e)
        die(f"cannot write the checkpoint {path}: {why}")


def load(path):
    """The checkpoint dict at path, read safely on the CPU; a missing, empty, unreadable or foreign file dies
    with one line naming it."""
    if not os.path.exists(path):
        die(f"no checkpoint at {path}: train a model first (python train.py --out_dir={os.path.dirname(path) or '.'})")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        die(f"{path} is empty (0 bytes): an interrupted write?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # e.g. torch's note on the pickle protocol of a foreign file
            ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - garbage, a truncated zip, a pickle of foreign objects, a directory
        die(f"{path} is not a trusted mipt checkpoint ({_reason(e)})")
    if not isinstance(ck, dict) or ck.get('format') != CKPT_FORMAT:
        found = f"format {ck.get('format')!r}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        die(f"{path} is not a mipt checkpoint: expected a dict with format {CKPT_FORMAT!r}, found {found}")
    return ck


def build_model(ck, device='cpu', path='the checkpoint', how=None):
    """MIPT(MIPTConfig(**ck['model_args'])), its mixers swapped for ck['peer'] if set (peers.py), with the
    weights ck['model'] if present (else freshly initialised), on `device`. The fields that say how it
    computes, not what (MIPTConfig.HOW), come from `how` (the loading run's settings; those it does not give:
    MIPTConfig's defaults), never from ck, which records the ones its own run used. A config or
    weights that do not fit this mipt.py die with one line naming the file."""
    from mipt import MIPT, MIPTConfig
    if not isinstance(ck.get('model_args'), dict):
        die(f"{path}: it has no model config (model_args): not a checkpoint that train.py wrote")
    args = {k: v for k, v in ck['model_args'].items() if k not in MIPTConfig.HOW}
    args.update(how or {})
    try:
        model = MIPT(MIPTConfig(**args))
    except (TypeError, ValueError) as e:
        die(f"{path}: its model config does not fit this mipt.py: {e}")
    if ck.get('peer'):
        try:
            from peers import use_peer
        except ModuleNotFoundError as e:
            if e.name != 'peers':
                raise
            die(f"{path}: the peer {ck['peer']!r} needs peers.py, which is missing")
        use_peer(model, ck['peer'])
    if ck.get('model') is not None:
        if not isinstance(ck['model'], dict):
            die(f"{path}: its weights ('model') are a {type(ck['model']).__name__}, not a state dict")
        misfit = weights_misfit(model.state_dict(), ck['model'])
        if misfit:
            die(f"{path}: its weights do not fit its model config ({misfit})")
        try:
            model.load_state_dict(ck['model'])
        except (RuntimeError, TypeError, AttributeError) as e:
            die(f"{path}: its weights do not fit its model config: {str(e).strip().splitlines()[0]}")
    return model.to(device)


def weights_misfit(want, got):
    """'' when the state dict `got` fits the model's `want`, else what does not fit: the first missing key,
    unexpected key, or key of another shape, with the sizes (and how many more there are)."""
    size = lambda t: tuple(getattr(t, 'shape', ()))
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and size(got[k]) != size(want[k])]
    found = ([f"{k}: the checkpoint holds {size(got[k])}, the config needs {size(want[k])}" for k in shapes] +
             [f"{k}: missing, the config needs {size(want[k])}" for k in missing] +
             [f"{k}: not in the config, the checkpoint holds {size(got[k])}" for k in extra])
    return found[0] + (f"; and {len(found) - 1} more" if len(found) > 1 else '') if found else ''
