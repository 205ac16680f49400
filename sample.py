"""
Sample from a trained mipt model (after nanoGPT's sample.py), or classify a text with a classifier.

    python sample.py --out_dir=out                              # stream text from out/ckpt.pt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out --start=FILE:prompt.txt      # prompt from a file
    python sample.py --out_dir=out --temperature=0              # greedy
    python sample.py --out_dir=out --compile=True               # GPU: compile the graphed step (long generations)
    python sample.py --out_dir=out --show_p=True                # colour tokens by measurement score s_t
    python sample.py --out_dir=out --show_p=True --p_html=p.html   # the same, also as an HTML page
    python sample.py --out_dir=out-imdb --start="A wonderful film."   # a classifier prints class probabilities
    python sample.py --help

Ctrl-C while text streams stops it: what was generated so far stays printed, a summary line says where it
stopped, and the exit status is 130 (interrupted, as a shell reports Ctrl-C), not 0. --p_html=FILE needs
--show_p=True (it writes that view). Errors are one line, `error: ...` (exit 2 for a bad setting, 1
otherwise); --debug=True shows the traceback instead.

Text comes from engine.decode, the one decoding loop: the prompt goes through one parallel pass (prefill),
then every new token through model.step (one CUDA graph replay per token on a GPU). A MIPT
model keeps O(1) state per layer (the complex state h plus at most K cached tokens); a Transformer-twin
checkpoint keeps the last block_size tokens and slides that window past block_size. The tokenizer comes
from the dataset meta stored inside the checkpoint.

--show_p=True reprints prompt + generation with each token's background coloured by its measurement
score s_t = mean_d p_t (blue = wave, s near 0; red = particle, s near 1), averaged over layers or for
--p_layer, and underlines the tokens that the particle cache holds at the end.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from html import escape

import torch

import checkpoint
import engine
import runs
from checkpoint import build_model, die, load
from codec import load_codec, truncate_doc
from configurator import configure

# -----------------------------------------------------------------------------
out_dir = 'out'              # the training run's directory
ckpt = 'ckpt.pt'             # checkpoint file name inside out_dir (ckpt_last.pt: the latest)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # autocast on CUDA
start = '\n'                 # prompt text, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 500
temperature = 0.8            # 0 = greedy, 1.0 = no change, < 1.0 = less random
top_k = 200                  # keep only the top_k most likely tokens (0 or None = all)
seed = 1337
show_p = False               # reprint the text coloured by measurement score s_t (MIPT models)
p_layer = -1                 # -1 = mean over layers, else this layer's s_t and cache
p_html = ''                  # with show_p: also write the coloured text to this HTML file
compile = False              # on a GPU: torch.compile the graphed decoding step (seconds first; faster per token)
debug = False                # re-raise errors with their traceback instead of a one-line message
# -----------------------------------------------------------------------------
configure(globals(), doc=__doc__)
# -----------------------------------------------------------------------------
checkpoint.DEBUG = debug
is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
for ok, msg in [(is_int(max_new_tokens) and max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}"),
                (is_int(num_samples) and num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
                (isinstance(temperature, float) and math.isfinite(temperature) and temperature >= 0,
                 f"temperature must be >= 0 and finite (0 = greedy), got {temperature}"),
                (top_k is None or is_int(top_k) and top_k >= 0, f"top_k must be >= 0 (0 = all), got {top_k}"),
                (is_int(seed) and -2 ** 63 <= seed < 2 ** 64, f"seed must be an integer in [-2**63, 2**64), got {seed}"),
                (is_int(p_layer), f"p_layer must be an integer (-1 = mean over layers), got {p_layer}"),
                (not p_html or show_p, f"--p_html={p_html} writes the --show_p view: add --show_p=True"),
                (dtype in ('float32', 'bfloat16', 'float16'), f"dtype must be float32, bfloat16 or float16, got {dtype!r}"),
                (device == 'cpu' or device.split(':')[0] == 'cuda', f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")]:
    if not ok:
        die(msg, 2)
device_type = 'cuda' if 'cuda' in device else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    die("device='cuda' but CUDA is not available: pass --device=cpu", 2)
if p_html:
    try:  # fail now, not after generating; an empty file is not left behind if anything stops the run
        existed = os.path.exists(p_html)
        open(p_html, 'a').close()
        if not existed:
            os.remove(p_html)
    except OSError as e:
        die(f"cannot write --p_html={p_html}: {e.strerror}", 2)
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        die(f"cannot read the prompt file {start[5:]!r}: {e.strerror}", 2)
    except UnicodeDecodeError:
        die(f"the prompt file {start[5:]!r} is not UTF-8 text", 2)

torch.manual_seed(seed)
path = os.path.join(out_dir, ckpt)
if not os.path.exists(path) and os.path.isdir(out_dir):  # a wrong --ckpt: say what is there
    present = sorted(os.listdir(out_dir))
    pts = [f for f in present if f.endswith('.pt')]
    if pts:
        listed = ', '.join(present[:12]) + (f", ... ({len(present)} files)" if len(present) > 12 else '')
        die(f"no checkpoint {ckpt!r} in {out_dir} (it holds {listed}): pass "
            + ' or '.join(f"--ckpt={f}" for f in pts), 2)
ck = load(path)
model = build_model(ck, device, path).eval()
config = model.config
meta = ck.get('meta') or {}
del ck
if not -1 <= p_layer < config.n_layer:
    die(f"p_layer={p_layer} but the model has {config.n_layer} layers (use -1 for their mean)", 2)
try:
    encode, decode = load_codec(meta)
    if meta.get('tokenizer') == 'ids':  # synthetic tasks: space-separated ids, also when streamed one by one
        decode = (lambda dec: lambda ids: dec(ids) + ' ')(decode)
except Exception as e:  # noqa: BLE001 - tiktoken offline, an unknown tokenizer, ...
    die(f"cannot load the tokenizer {meta.get('tokenizer')!r} of dataset {meta.get('name')!r}: {str(e).splitlines()[0]}")
ctx = torch.amp.autocast(device_type='cuda', dtype=getattr(torch, dtype)) if device_type == 'cuda' else nullcontext()
is_mipt, classifier = config.mixer == 'mipt', config.n_classes > 0
if not classifier and max_new_tokens == 0:
    die("max_new_tokens=0 would generate nothing: give --max_new_tokens=N with N >= 1", 2)
show = show_p and is_mipt
if show_p and not is_mipt:
    print("(--show_p: an attention checkpoint has no measurement score; showing plain text"
          + (f", writing no {p_html})" if p_html else ')'))

try:
    ids = list(encode(start))
except (KeyError, ValueError) as e:
    die(f"the prompt does not fit the model's tokenizer ({meta.get('tokenizer')}): {e}", 2)
eot = meta.get('eot_token')
if classifier and eot is not None and (not ids or ids[-1] != eot):
    ids.append(eot)  # documents were read out at their final EOT token in training
if not ids:
    die("empty prompt: give --start=TEXT", 2)
T = config.block_size
if classifier and len(ids) > T:  # the same truncation as in training
    ids = truncate_doc(ids, T, eot)
    print(f"(the text is longer than block_size={T}: truncated as in training)")
if not is_mipt and len(ids) > T:
    print(f"(attention checkpoint: the prompt has {len(ids)} tokens; keeping the last block_size={T})")
x = torch.tensor([ids], device=device)


def scores_of(tokens):
    """Per token, the per-layer measurement scores s_t of a parallel pass (MIPT only)."""
    with ctx:
        s = runs.probe(model, tokens)['s']
    return [[float(sl[0, t]) for sl in s] for t in range(tokens.shape[1])]


def render_p(tokens, s_hist, state):
    """The text again, each token on a background from blue (s=0, wave) to red (s=1, particle)."""
    layers = list(range(config.n_layer)) if p_layer < 0 else [p_layer]
    cached = set()
    for l in layers:
        if state.layers[l].cache is not None:
            cached |= {int(p) for p in state.layers[l].cache.pos[0].tolist() if p >= 0}
    colour = lambda v: (int(30 + 225 * v), int(60 * (1 - abs(2 * v - 1))), int(255 - 225 * v))
    out, html = [], []
    for i, (tok, s) in enumerate(zip(tokens, s_hist)):
        v = min(max(sum(s[l] for l in layers) / len(layers), 0.0), 1.0)
        r, g, b = colour(v)
        text = decode([tok])
        nl = text.endswith('\n')
        text = text.replace('\n', '↵')
        style = f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;255;255;255m" + ("\x1b[1;4m" if i in cached else '')
        out.append(style + text + "\x1b[0m" + ('\n' if nl else ''))
        css = f"background:rgb({r},{g},{b})" + (';font-weight:bold;text-decoration:underline' if i in cached else '')
        html.append(f'<span style="{css}" title="t={i} s={v:.3f}">{escape(text)}</span>' + ('<br>' if nl else ''))
    which = 'mean over layers' if p_layer < 0 else f'layer {p_layer}'
    swatch = ''.join("\x1b[48;2;%d;%d;%dm\x1b[38;2;255;255;255m" % colour(v) + f" {v:.2f} \x1b[0m"
                     for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    print(f"s_t = mean_d p_t ({which}): {swatch}  blue = wave (keeps rotating), red = particle (collapses onto "
          f"the token); \x1b[1;4mbold underlined\x1b[0m = held in the particle cache at the end ({len(cached)} tokens)")
    print(''.join(out))
    mean = [sum(s[l] for s in s_hist) / len(s_hist) for l in range(config.n_layer)]
    print("mean s_t per layer: " + ' '.join(f"{m:.3f}" for m in mean))
    if p_html:
        with open(p_html, 'w', encoding='utf-8') as f:
            f.write(f'<!doctype html><meta charset="utf-8"><title>s_t: {escape(out_dir)}</title>\n'
                    f'<p>{escape(out_dir)}: s_t = mean_d p_t ({which}); blue = wave (s near 0), red = particle '
                    f'(s near 1); <b><u>bold underlined</u></b> = held in the particle cache at the end '
                    f'({len(cached)} tokens). Mean s_t per layer: {" ".join(f"{m:.3f}" for m in mean)}. '
                    f'Hover a token for its position and score.</p>\n'
                    f'<div style="font-family:monospace;color:white;line-height:1.6;white-space:pre-wrap">{"".join(html)}</div>\n')
        print(f"(written to {p_html})")


def stream_printer():
    """Print ids as they come; hold back bytes of an unfinished UTF-8 character."""
    pending = []

    def put(tok=None, final=False):
        if tok is not None:
            pending.append(tok)
        text = decode(pending) if pending else ''
        if text and (final or not text.endswith('\ufffd')):
            sys.stdout.write(text)
            sys.stdout.flush()
            pending.clear()
    return put


# ---------------------------------------------------------------- a classifier: class probabilities
if classifier:
    t0 = time.time()
    with torch.no_grad(), ctx:
        logits, state = model.prefill(x)
    dt = time.time() - t0
    probs = torch.softmax(logits[0].float(), -1).tolist()
    names = meta.get('label_names') or [str(i) for i in range(config.n_classes)]
    print(f"{len(ids)} tokens classified in {dt:.2f} s; decoding state {model.state_bytes(state):,} bytes")
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        print(f"  {names[i] if i < len(names) else i:>12s}  {probs[i]:.4f}")
    if show:
        render_p(ids, scores_of(x), state)
    sys.exit(0)

# ---------------------------------------------------------------- a language model: stream text
n_vocab = meta.get('vocab_size', config.vocab_size)  # the model's vocabulary may be padded beyond it
for k in range(num_samples):
    put = stream_printer()
    for tok in ids:
        put(tok)
    put(final=True)
    s_hist = scores_of(x) if show else None
    new, state, t0, stopped = [], None, time.time(), False
    try:
        with ctx:
            for d in engine.decode(model, x, max_new_tokens, temperature, top_k, n_vocab=n_vocab, want_s=show,
                                   compile=compile):
                tok = int(d.token[0])
                new.append(tok)
                put(tok)
                state = d.state
                if show:
                    s_hist.append([float(s[0]) for s in d.s])
    except KeyboardInterrupt:  # Ctrl-C: keep what was generated, say where it stopped
        stopped = True
    put(final=True)
    dt = time.time() - t0
    if stopped:
        rest = num_samples - k - 1
        left = f"; {rest} more sample{'s' if rest > 1 else ''} not started" if rest else ''
        print(f"\n--- sample {k + 1}/{num_samples}: interrupted (Ctrl-C) after {len(new)} of {max_new_tokens} new "
              f"tokens in {dt:.2f} s{left}{'; no --show_p view' if show else ''}")
        sys.exit(130)
    state_bytes = model.state_bytes(state)
    window = not is_mipt and len(ids) + len(new) > T
    print(f"\n--- sample {k + 1}/{num_samples}: {len(ids)} prompt tokens, {len(new)} new tokens in {dt:.2f} s "
          f"({len(new) / max(dt, 1e-9):,.1f} tokens/s, prefill included); decoding state"
          f"{' + cache' if is_mipt and config.cache_size else ''}: {state_bytes:,} bytes"
          + (f" (attention: a KV cache of block_size={T}, then a sliding window)" if window else ''))
    if show:
        render_p(ids + new, s_hist, state)
