"""CPU tests of engine.py, the decoding engine: the decode loop and its policies, the twin's sliding window and
static KV cache, and what a CUDA graph captures (a step without host syncs, Linear weights cast once). The graph
replays themselves need a GPU (test_cuda.py)."""

import pytest
import torch

import engine
from mipt import MIPT
from test_mipt import lively, small  # shared model builders


def test_graphed_step_needs_cuda_and_a_finite_cache():
    model = MIPT(small(cache_size=3)).eval()
    _, state = model.prefill(torch.randint(0, 40, (1, 5)))
    assert not engine.graphable(model)  # on the CPU
    with pytest.raises(ValueError, match='on a CUDA device'):
        engine.graphed_step(model, state)
    with pytest.raises(ValueError, match='finite cache'):
        engine.graphed_step(MIPT(small(cache_size=-1)).eval(), state)
    with pytest.raises(ValueError, match='on a CUDA device'):   # the twin graphs too, with a static KV cache
        engine.graphed_step(MIPT(small(mixer='attention', cache_size=0)).eval(), state)


def test_static_kv_cache_steps_like_the_growing_one():
    """The twin's preallocated KV cache (what graphed_step decodes with) gives the growing cache's logits."""
    torch.manual_seed(0)
    model = MIPT(small(mixer='attention', cache_size=0, block_size=32)).eval()
    prompt = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        _, grow = model.prefill(prompt)
        _, fixed = model.prefill(prompt)
        fixed.layers = [engine.to_static(st, 32) for st in fixed.layers]
        tok = prompt[:, -1]
        for _ in range(20):
            la, grow = model.step(tok, grow)
            lb, fixed = model.step(tok, fixed)
            assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
            tok = la.argmax(-1)
    assert isinstance(fixed.layers[0], engine.StaticKVCache) and fixed.layers[0].k.shape[2] == 32
    assert torch.equal(fixed.layers[0].k[:, :, :27], grow.layers[0].k) and not fixed.layers[0].k[:, :, 27:].any()
    with pytest.raises(ValueError, match='cannot hold 27'):
        engine.to_static(grow.layers[0], 26)


@pytest.mark.parametrize('mixer', ['mipt', 'attention'])
def test_graphable_step_traces_without_a_host_sync(mixer):
    """What graphed_step captures: step_into with the position as a tensor (and the twin's static KV cache) must not
    read a value back to the host (a .item() or a tensor's bool breaks a CUDA graph capture). torch.compile
    with fullgraph=True refuses any such break, so it checks this on the CPU; the logits equal eager's."""
    torch.manual_seed(0)
    model = MIPT(small(mixer=mixer, cache_size=4 if mixer == 'mipt' else 0, block_size=32)).eval()
    prompt = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        _, ref = model.prefill(prompt)
        _, st = model.prefill(prompt)
        if mixer == 'attention':
            st.layers = [engine.to_static(s, 32) for s in st.layers]
        st.pos = torch.tensor(st.pos)
        traced = torch.compile(lambda t, s: engine.step_into(model, t, s), backend='eager', fullgraph=True)
        tok = prompt[:, -1]
        for _ in range(3):
            la, ref = model.step(tok, ref)
            lb = traced(tok, st)
            assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
            tok = la.argmax(-1)
    assert int(st.pos) == ref.pos == 10


@pytest.mark.parametrize('mixer', ['mipt', 'attention'])
def test_linears_cast_once_is_autocast_s_function(mixer):
    """graphed_step captures within linears_cast: each Linear's float32 weights cast once to the autocast dtype.
    The step computes the same logits bit for bit as autocast casting them per call; afterwards every parameter
    is the model's own again (the head still tied to the embedding)."""
    torch.manual_seed(0)
    model = MIPT(small(mixer=mixer, cache_size=4 if mixer == 'mipt' else 0, block_size=32)).eval()
    before = {n: p for n, p in model.named_parameters()}
    prompt = torch.randint(0, 40, (2, 7))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        _, st = model.prefill(prompt)
        ref, _ = model.step(prompt[:, -1], engine.map_state(st, torch.clone))
        with engine.linears_cast(model, torch.bfloat16) as cast:
            assert model.head.weight.dtype == torch.bfloat16 and model.wte.weight.dtype == torch.float32
            assert len(cast) == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) + sum(
                isinstance(m, torch.nn.Linear) and m.bias is not None for m in model.modules())
            got, _ = model.step(prompt[:, -1], engine.map_state(st, torch.clone))
    assert torch.equal(got, ref)
    assert {n: p for n, p in model.named_parameters()} == before and model.head.weight is model.wte.weight
    with engine.linears_cast(model, None) as cast:
        assert cast == [] and model.head.weight.dtype == torch.float32


def test_linears_cast_that_fails_part_way_puts_back_what_it_swapped(monkeypatch):
    """Out of memory on the tenth cast (the tied head, the largest, comes last): the nine before it go back."""
    model = MIPT(small(cache_size=4)).eval()
    before = dict(model.named_parameters())
    made, real = [0], torch.nn.Parameter

    def failing(t, requires_grad=True):
        made[0] += 1
        if made[0] == 10:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(t, requires_grad=requires_grad)
    monkeypatch.setattr(torch.nn, 'Parameter', failing)
    with pytest.raises(torch.OutOfMemoryError):
        with engine.linears_cast(model, torch.bfloat16):
            pass
    assert made[0] == 10 and dict(model.named_parameters()) == before
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.head.weight is model.wte.weight


def test_step_into_needs_a_tensor_position():
    """step_into advances the position in place, which an int cannot be: refused with one line."""
    model = MIPT(small(cache_size=4)).eval()
    with torch.no_grad():
        _, st = model.prefill(torch.randint(0, 40, (2, 7)))
        with pytest.raises(ValueError, match='state.pos in place: it must be a tensor'):
            engine.step_into(model, torch.zeros(2, dtype=torch.long), st)


def tokens(model, prompt, n, **kw):
    return torch.stack([d.token for d in engine.decode(model, prompt, n, **kw)], 1)


def test_decode_policies():
    torch.manual_seed(0)
    model = lively(MIPT(small(cache_size=3))).double().eval()
    prompt = torch.randint(0, 40, (2, 6))
    greedy = tokens(model, prompt, 8, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 8, temperature=0)[:, 6:])   # generate: the same policy
    assert torch.equal(greedy, tokens(model, prompt, 8, top_k=1))      # top_k=1 samples the argmax
    torch.manual_seed(1)
    a = tokens(model, prompt, 8, top_k=0)                              # 0 = every token, like None
    torch.manual_seed(1)
    assert torch.equal(a, tokens(model, prompt, 8, top_k=None))
    torch.manual_seed(1)
    assert torch.equal(a, model.generate(prompt, 8)[:, 6:])             # the same draws as the eager loop
    for _ in range(3):                                                 # a padded vocabulary is cropped
        assert tokens(model, prompt, 20, temperature=2.0, n_vocab=5).max() < 5
    steps = list(engine.decode(model, prompt, 4, temperature=0, want_s=True))
    assert [d.token.shape for d in steps] == [(2,)] * 4 and len(steps[-1].s) == 2
    assert steps[-1].state.pos == 6 + 4                               # want_s consumes the last token too
    assert torch.equal(torch.stack([d.token for d in steps], 1), greedy[:, :4])
    assert list(engine.decode(model, prompt, 0)) == []


def test_decode_attention_slides_its_window():
    torch.manual_seed(0)
    model = MIPT(small(mixer='attention', cache_size=0, block_size=8)).double().eval()
    prompt = torch.randint(0, 40, (1, 12))                           # longer than block_size: cropped
    out = tokens(model, prompt, 10, temperature=0)
    ref = prompt
    for _ in range(10):
        ref = torch.cat([ref, model(ref[:, -8:])[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref[:, 12:])


@pytest.mark.parametrize('kw', [dict(temperature=-1), dict(top_k=-3), dict(max_new_tokens=-5)])
def test_decode_bad_arguments(kw):
    model = MIPT(small(cache_size=3)).eval()
    args = dict(max_new_tokens=3) | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        list(engine.decode(model, torch.zeros(1, 3, dtype=torch.long), **args))
    with pytest.raises(ValueError, match='classifier'):
        list(engine.decode(MIPT(small(n_classes=2)), torch.zeros(1, 3, dtype=torch.long), 2))
