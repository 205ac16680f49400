"""
Sample from a trained mipt model (after nanoGPT's sample.py), or classify a text with a classifier.

    python sample.py --out_dir=out                              # stream text from out/ckpt.pt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out --start=FILE:prompt.txt      # prompt from a file
    python sample.py --out_dir=out --show_p=True                # colour tokens by measurement score s_t
    python sample.py --out_dir=out --show_p=True --p_html=p.html   # the same, also as an HTML page
    python sample.py --out_dir=out-imdb --start="A wonderful film."   # a classifier prints class probabilities
    python sample.py --help

Decoding streams one token at a time through model.step: a MIPT model keeps O(1) state per layer (the
complex state h plus at most K cached tokens), so a prompt of any length streams through it. A
Transformer-twin checkpoint keeps a KV cache of at most block_size tokens: a longer prompt is cut to its
last block_size tokens, and past block_size generation continues on a sliding window of the last
block_size tokens. The tokenizer comes from the dataset meta stored inside the checkpoint.

--show_p=True reprints prompt + generation with each token's background coloured by its measurement
score s_t = mean_d p_t (blue = wave, s near 0; red = particle, s near 1), averaged over layers or for
--p_layer, and underlines the tokens that the particle cache holds at the end.
"""
import os
import sys
import time
from html import escape

import torch

from configurator import configure

# -----------------------------------------------------------------------------
out_dir = 'out'              # the training run's directory
ckpt = 'ckpt.pt'             # checkpoint file name inside out_dir (ckpt_last.pt: the latest)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
start = '\n'                 # prompt text, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 500
temperature = 0.8            # 1.0 = no change, < 1.0 = less random
top_k = 200                  # keep only the top_k most likely tokens (None or 0 = all)
seed = 1337
show_p = False               # reprint the text coloured by measurement score s_t (MIPT models)
p_layer = -1                 # -1 = mean over layers, else this layer's s_t and cache
p_html = ''                  # with show_p: also write the coloured text to this HTML file
# -----------------------------------------------------------------------------
configure(globals(), doc=__doc__)
# -----------------------------------------------------------------------------
CKPT_FORMAT = 'mipt-ckpt-1'


def die(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def load_checkpoint(path, map_location='cpu'):
    """Read a mipt checkpoint safely (weights_only=True) or stop with a clear message."""
    if not os.path.exists(path):
        die(f"no checkpoint at {path}: train a model first (python train.py --out_dir={os.path.dirname(path) or '.'})"
            f" or point --out_dir/--ckpt at one")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - garbage bytes, a pickle with foreign objects, a truncated file ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
        die(f"{path} is not a mipt checkpoint: torch.load(weights_only=True) cannot read it "
            f"({type(e).__name__}: {msg[:200]})")
    if not isinstance(ck, dict) or ck.get('format') != CKPT_FORMAT:
        what = f"a dict with format {ck.get('format')!r}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        die(f"{path} is not a mipt checkpoint: expected a dict with format {CKPT_FORMAT!r}, found {what}")
    return ck


def load_tokenizer(meta):
    """(encode, decode) for the dataset meta stored in the checkpoint."""
    if meta.get('tokenizer') == 'ids':  # synthetic tasks (needle): space-separated token ids
        def encode(s):
            try:
                return [int(w) for w in s.split()]
            except ValueError:
                die("this model reads token ids: give --start as space-separated integers, e.g. --start='10 250 261'")
        return encode, lambda ids: ' '.join(str(int(i)) for i in ids) + ' '
    try:
        from data.common import load_codec
        return load_codec(meta)
    except Exception as e:  # noqa: BLE001
        die(f"cannot load the tokenizer {meta.get('tokenizer')!r} of dataset {meta.get('name')!r} offline: {e}")


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from mipt import MIPTConfig, MIPT

    torch.manual_seed(seed)
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        die("device='cuda' but CUDA is not available: pass --device=cpu", 2)
    path = os.path.join(out_dir, ckpt)
    ck = load_checkpoint(path)
    try:
        config = MIPTConfig(**ck['model_args'])
    except (TypeError, ValueError) as e:
        die(f"{path}: its model config does not fit this mipt.py: {e}")
    model = MIPT(config)
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        die(f"{path}: its weights do not fit this mipt.py: {str(e).splitlines()[0]}")
    model.eval().to(device)
    meta = ck.get('meta') or {}
    encode, decode = load_tokenizer(meta)
    is_mipt = config.mixer == 'mipt'
    classifier = config.n_classes > 0
    n_vocab = meta.get('vocab_size', config.vocab_size)  # the model's vocabulary may be padded beyond it
    ctx = torch.amp.autocast(device_type='cuda', dtype=torch.bfloat16) \
        if device_type == 'cuda' and torch.cuda.is_bf16_supported() else torch.autocast('cpu', enabled=False)
    del ck

    if start.startswith('FILE:'):
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    try:
        ids = list(encode(start))
    except KeyError as e:
        die(f"the prompt has a character outside the model's vocabulary ({meta.get('tokenizer')}): {e}")
    eot = meta.get('eot_token')
    if classifier and eot is not None and (not ids or ids[-1] != eot):
        ids.append(eot)  # documents were read out at their final EOT token in training
    if not ids:
        die("empty prompt: give --start=TEXT")
    T = config.block_size
    if classifier and len(ids) > T:  # the same truncation as in training
        ids = ids[:T - 1] + ids[-1:] if eot is not None and ids[-1] == eot else ids[:T]
        print(f"(the text is longer than block_size={T}: truncated as in training)")
    if not is_mipt and len(ids) > T:
        print(f"(attention checkpoint: the prompt has {len(ids)} tokens; keeping the last block_size={T})")
        ids = ids[-T:]

    # on a GPU a MIPT model with a finite cache decodes through one CUDA graph replay per token
    use_graph = model.graphable()
    amp = torch.bfloat16 if device_type == 'cuda' and torch.cuda.is_bf16_supported() else None

    def fresh_state():
        state = model.init_state(1)
        return state, (model.graphed_step(state, amp) if use_graph else None)

    @torch.no_grad()
    def feed(tok, state, context):
        """One token through model.step; past block_size an attention model recomputes a sliding window."""
        if graphed is not None:
            logits, state = graphed(torch.tensor([tok], device=device))
            return logits.float(), state, None
        if is_mipt or state[0]['t'] < T:
            with ctx:
                logits, state = model.step(torch.tensor([tok], device=device), state)
            return logits.float(), state, None
        with ctx:
            logits, _ = model(torch.tensor([context[-T:]], device=device))
        return logits[:, -1].float(), state, 'window'

    def scores(state):
        """Per-layer measurement score s_t of the token just consumed (MIPT only)."""
        return [float(st['s'][0]) for st in state] if is_mipt else None

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

    def render_p(tokens, s_hist, state):
        """The text again, each token on a background from blue (s=0, wave) to red (s=1, particle)."""
        L = len(state)
        layers = list(range(L)) if p_layer < 0 else [p_layer]
        if any(not 0 <= l < L for l in layers):
            die(f"p_layer={p_layer} but the model has {L} layers")
        cached = set()
        for l in layers:
            if 'pos' in state[l]:  # a MIPT layer with a cache (K != 0)
                cached |= {int(p) for p in state[l]['pos'][0].tolist() if p >= 0}
        out, html = [], []
        for i, (tok, s) in enumerate(zip(tokens, s_hist)):
            v = sum(s[l] for l in layers) / len(layers)
            v = min(max(v, 0.0), 1.0)
            r, g, b = int(30 + 225 * v), int(60 * (1 - abs(2 * v - 1))), int(255 - 225 * v)
            text = decode([tok])
            nl = text.endswith('\n')
            text = text.replace('\n', '↵')
            style = f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;255;255;255m" + ("\x1b[1;4m" if i in cached else '')
            out.append(style + text + "\x1b[0m" + ('\n' if nl else ''))
            css = f"background:rgb({r},{g},{b})" + (';font-weight:bold;text-decoration:underline' if i in cached else '')
            html.append(f'<span style="{css}" title="t={i} s={v:.3f}">{escape(text)}</span>' + ('<br>' if nl else ''))
        which = 'mean over layers' if p_layer < 0 else f'layer {p_layer}'
        legend = ("s_t = mean_d p_t (" + which + "): " +
                  ''.join(f"\x1b[48;2;{int(30 + 225 * v)};{int(60 * (1 - abs(2 * v - 1)))};{int(255 - 225 * v)}m"
                          f"\x1b[38;2;255;255;255m {v:.2f} \x1b[0m" for v in (0.0, 0.25, 0.5, 0.75, 1.0)) +
                  "  blue = wave (keeps rotating), red = particle (collapses onto the token); "
                  f"\x1b[1;4mbold underlined\x1b[0m = held in the particle cache at the end "
                  f"({len(cached)} tokens)")
        print(legend)
        print(''.join(out))
        mean = [sum(s[l] for s in s_hist) / len(s_hist) for l in range(L)]
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

    if show_p and not is_mipt:
        print("(--show_p: an attention checkpoint has no measurement score; showing plain text)")
    show = show_p and is_mipt

    # ---------------------------------------------------------------- classifier
    if classifier:
        state, graphed = fresh_state()
        s_hist = []
        t0 = time.time()
        for tok in ids:
            logits, state, _ = feed(tok, state, ids)
            s_hist.append(scores(state))
        dt = time.time() - t0
        probs = torch.softmax(logits[0], -1).tolist()
        names = meta.get('label_names') or [str(i) for i in range(config.n_classes)]
        print(f"{len(ids)} tokens classified in {dt:.2f} s ({len(ids) / dt:,.0f} tokens/s); "
              f"state+cache {model.state_bytes(state):,} bytes")
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
            print(f"  {names[i] if i < len(names) else i:>12s}  {probs[i]:.4f}")
        if show:
            render_p(ids, s_hist, state)
        sys.exit(0)

    # ---------------------------------------------------------------- language model
    for k in range(num_samples):
        state, graphed = fresh_state()
        context = list(ids)
        s_hist = []
        t0 = time.time()
        for tok in ids:  # prefill, one token at a time: O(1) state for MIPT
            logits, state, _ = feed(tok, state, context)
            s_hist.append(scores(state))
        t_prompt = time.time() - t0
        put = stream_printer()
        for tok in ids:
            put(tok)
        put(final=True)
        t1, note, state_full = time.time(), False, model.state_bytes(state)
        for i in range(max_new_tokens):
            logits = logits[:, :n_vocab] / max(temperature, 1e-6)
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            tok = int(torch.multinomial(torch.softmax(logits, -1), 1))
            context.append(tok)
            put(tok)
            if i == max_new_tokens - 1 and not show:
                break  # the last token needs no forward pass
            logits, state, mode = feed(tok, state, context)
            if mode == 'window' and not note:
                note = True
                state_full = model.state_bytes(state)
            if mode is None:
                s_hist.append(scores(state))
        put(final=True)
        dt = time.time() - t1
        n_new = max_new_tokens
        print()
        print(f"--- sample {k + 1}/{num_samples}: prompt {len(ids)} tokens ({len(ids) / max(t_prompt, 1e-9):,.0f} tok/s), "
              f"{n_new} new tokens in {dt:.2f} s ({n_new / max(dt, 1e-9):,.1f} tokens/s); "
              f"decoding state{' + cache' if is_mipt and config.cache_size else ''}: "
              f"{(model.state_bytes(state) if not note else state_full):,} bytes"
              + (f" (attention: a KV cache of block_size={T}, then a sliding window)" if note else ''))
        if show:
            render_p(context[:len(s_hist)], s_hist, state)
