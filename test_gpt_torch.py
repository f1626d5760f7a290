"""Issue 22's layers against PyTorch, in float64: forward to 1e-10 and every
gradient (the input's and each parameter's, from a random upstream dy) to
1e-10, for LayerNorm, SelfAttention, bias-free Dense on (N, T, D), exact GELU,
PositionalEmbedding, Residual and TiedEmbedding; the documented mapping to
``nn.MultiheadAttention``; and a whole 2-layer GPT (loss and every gradient)
against a nanoGPT-style ``nn.Module`` built from the same weights.

Each test skips where torch is not installed (``pip install -e '.[bench]'``); nothing
imports torch at module level, so the tests can move into test_dlfs.py as they are.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlfs

TOL = 1e-10


def _torch():
    """torch, or skip the calling test (each test asks: no module-level import)."""
    return pytest.importorskip("torch", reason="the PyTorch comparisons need torch")


def _close(ours, theirs, what: str) -> float:
    """|ours - theirs| <= 1e-10 * max(1, max|theirs|) elementwise; returns the max error."""
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != torch's {theirs.shape}"
    err = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    scale = max(1.0, float(np.abs(theirs).max()) if theirs.size else 0.0)
    assert err <= TOL * scale, f"{what}: max |dlfs - torch| = {err:.3e} (scale {scale:.3g})"
    return err


def _t(torch, a: np.ndarray, grad: bool = True):
    return torch.tensor(np.array(a), dtype=torch.float64, requires_grad=grad)


def _layer_vs_torch(torch, layer, x: np.ndarray, ref, params: tuple, rng, name: str) -> None:
    """dlfs layer on x against ``ref(x_t, *params_t)``: output, dx and every grad.

    ``params``: the layer's arrays in ``layer.params()``'s order and dlfs's layout
    (``ref`` transposes where torch's layout differs), so torch's gradients compare
    with dlfs's as they are."""
    y, cache, _ = layer.forward(x)
    xt = _t(torch, x)
    pt = [_t(torch, p) for p in params]
    yt = ref(xt, *pt)
    _close(y, yt, f"{name} output")
    dy = rng.standard_normal(y.shape)
    dx, grads = layer.backward(cache, dy)
    (yt * torch.from_numpy(dy)).sum().backward()
    _close(dx, xt.grad, f"{name} dx")
    assert len(grads) == len(layer.params()) == len(pt)
    for i, (g, p) in enumerate(zip(grads, pt)):
        _close(g, p.grad, f"{name} grad of params()[{i}]")


# ------------------------------------------------------------------ LayerNorm


@settings(max_examples=8, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize(("scale", "bias"), [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(scale, bias, lead, d, seed):
    """dlfs.LayerNorm over the last axis == F.layer_norm(x, (D,), gamma, beta, 1e-5)."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    layer = dlfs.LayerNorm.init(d, scale=scale, bias=bias, dtype=np.float64)
    fresh = [
        rng.standard_normal(p.shape) + (1.0 if i == 0 and scale else 0.0)
        for i, p in enumerate(layer.params())
    ]
    layer = layer.with_params(fresh)
    x = rng.standard_normal((*lead, d)) * 3 + rng.standard_normal()

    def ref(xt, *ps):
        gamma = ps[0] if scale else None
        beta = ps[-1] if bias else None
        return F.layer_norm(xt, (d,), gamma, beta, 1e-5)

    _layer_vs_torch(torch, layer, x, ref, tuple(fresh), rng, "LayerNorm")


def test_layer_norm_module_mapping():
    """nn.LayerNorm(D, bias=False).weight is gamma (nanoGPT's LayerNorm without bias)."""
    torch = _torch()
    rng = np.random.default_rng(3)
    d = 6
    gamma = rng.standard_normal(d)
    module = torch.nn.LayerNorm(d, eps=1e-5, bias=False, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma))
    x = rng.standard_normal((2, 5, d))
    y, _, _ = dlfs.LayerNorm(gamma).forward(x)
    _close(y, module(torch.from_numpy(x)), "LayerNorm vs nn.LayerNorm(bias=False)")


# -------------------------------------------------------------- SelfAttention


def _attention_ref(torch, n_heads: int, causal: bool, bias: bool, explicit: bool):
    """torch: qkv = x W_qkv (+b), heads of D/H, softmax(q k^T / sqrt(D/H)) v, y = O W_o (+b)."""

    F = torch.nn.functional

    def ref(xt, *ps):
        if bias:
            w_qkv, b_qkv, w_o, b_o = ps
        else:
            (w_qkv, w_o), b_qkv, b_o = ps, None, None
        n, t, d = xt.shape
        qkv = xt @ w_qkv + (b_qkv if bias else 0)
        q, k, v = (a.view(n, t, n_heads, d // n_heads).transpose(1, 2) for a in qkv.split(d, 2))
        if explicit:
            att = (q @ k.transpose(-2, -1)) / (d // n_heads) ** 0.5
            if causal:
                mask = torch.ones(t, t, dtype=torch.bool).triu(1)
                att = att.masked_fill(mask, float("-inf"))
            o = att.softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        o = o.transpose(1, 2).reshape(n, t, d)
        return o @ w_o + (b_o if bias else 0)

    return ref


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 3),
    t=st.integers(1, 7),
    n_heads=st.integers(1, 4),
    head_dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_matches_torch(causal, bias, n, t, n_heads, head_dim, seed):
    """SelfAttention == nanoGPT's CausalSelfAttention computed by torch (its
    scaled_dot_product_attention, and the explicit masked softmax), output and grads."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    d = n_heads * head_dim
    w_qkv, w_o = rng.standard_normal((d, 3 * d)) * 0.7, rng.standard_normal((d, d)) * 0.7
    b_qkv, b_o = (rng.standard_normal(3 * d), rng.standard_normal(d)) if bias else (None, None)
    layer = dlfs.SelfAttention(w_qkv, w_o, b_qkv, b_o, n_heads=n_heads, causal=causal)
    params = (w_qkv, b_qkv, w_o, b_o) if bias else (w_qkv, w_o)
    assert len(layer.params()) == len(params)
    for p, q in zip(layer.params(), params):
        np.testing.assert_array_equal(p, q)  # params() order: (w_qkv, b_qkv?, w_o, b_o?)
    x = rng.standard_normal((n, t, d))
    for explicit in (False, True):
        ref = _attention_ref(torch, n_heads, causal, bias, explicit)
        _layer_vs_torch(torch, layer, x, ref, params, rng, f"SelfAttention(explicit={explicit})")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_maps_to_multihead_attention(causal, bias):
    """The documented mapping: nn.MultiheadAttention(D, H, batch_first=True) with
    in_proj_weight = w_qkv.T, in_proj_bias = b_qkv, out_proj.weight = w_o.T,
    out_proj.bias = b_o, and a causal attn_mask gives dlfs's output (and dx)."""
    torch = _torch()
    rng = np.random.default_rng(7)
    n, t, d, h = 2, 6, 12, 3
    w_qkv, w_o = rng.standard_normal((d, 3 * d)) * 0.5, rng.standard_normal((d, d)) * 0.5
    b_qkv, b_o = (rng.standard_normal(3 * d), rng.standard_normal(d)) if bias else (None, None)
    layer = dlfs.SelfAttention(w_qkv, w_o, b_qkv, b_o, n_heads=h, causal=causal)
    mha = torch.nn.MultiheadAttention(d, h, bias=bias, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(w_qkv.T.copy()))
        mha.out_proj.weight.copy_(torch.from_numpy(w_o.T.copy()))
        if bias:
            mha.in_proj_bias.copy_(torch.from_numpy(b_qkv))
            mha.out_proj.bias.copy_(torch.from_numpy(b_o))
    x = rng.standard_normal((n, t, d))
    xt = _t(torch, x)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1) if causal else None
    yt, _ = mha(xt, xt, xt, attn_mask=mask, need_weights=False)
    y, cache, _ = layer.forward(x)
    _close(y, yt, "SelfAttention vs nn.MultiheadAttention output")
    dy = rng.standard_normal(y.shape)
    (yt * torch.from_numpy(dy)).sum().backward()
    dx, grads = layer.backward(cache, dy)
    _close(dx, xt.grad, "SelfAttention vs nn.MultiheadAttention dx")
    _close(grads[0], mha.in_proj_weight.grad.T, "d w_qkv vs in_proj_weight.grad.T")
    _close(grads[-2 if bias else -1], mha.out_proj.weight.grad.T, "d w_o vs out_proj.weight.grad.T")


# ------------------------------------------------- Dense, GELU, positions


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
def test_dense_without_bias_matches_torch_linear(shape):
    """Dense(w, None) on (N, D) and (N, T, D) == F.linear(x, w.T): nn.Linear(bias=False)
    holds weight = w.T."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(11)
    w = rng.standard_normal((shape[-1], 7))
    layer = dlfs.Dense(w, None)
    assert len(layer.params()) == 1
    _layer_vs_torch(
        torch,
        layer,
        rng.standard_normal(shape),
        lambda xt, wt: F.linear(xt, wt.T),
        (w,),
        rng,
        "Dense(bias=None)",
    )


def test_exact_gelu_matches_torch():
    """GELU(approximate="none") == F.gelu (erf form) over [-40, 40], value and slope."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(-40, 40, 4000), rng.standard_normal(500) * 4])
    x = x.reshape(9, -1)
    _layer_vs_torch(
        torch, dlfs.GELU(approximate="none"), x, lambda xt: F.gelu(xt), (), rng, "GELU(none)"
    )
    _layer_vs_torch(
        torch,
        dlfs.GELU(approximate="tanh"),
        x,
        lambda xt: F.gelu(xt, approximate="tanh"),
        (),
        rng,
        "GELU(tanh)",
    )


@pytest.mark.parametrize("t", [1, 5, 8])
def test_positional_embedding_matches_torch(t):
    """x + w[:T] for T <= T_max; the rows of w beyond T get a zero gradient."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(t)
    t_max, d = 8, 4
    w = rng.standard_normal((t_max, d))
    ref = lambda xt, wt: xt + F.embedding(torch.arange(xt.shape[1]), wt)  # noqa: E731
    _layer_vs_torch(
        torch,
        dlfs.PositionalEmbedding(w),
        rng.standard_normal((3, t, d)),
        ref,
        (w,),
        rng,
        "PositionalEmbedding",
    )


# ------------------------------------------------------- Residual, tying


def test_residual_around_dense_chain_matches_torch():
    """Residual((LayerNorm, Dense, GELU, Dense)) == x + f(x); grads flattened in order."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(13)
    d, hidden = 5, 9
    gamma, beta = 1 + 0.3 * rng.standard_normal(d), 0.3 * rng.standard_normal(d)
    w1, b1, w2 = (rng.standard_normal(s) * 0.6 for s in ((d, hidden), (hidden,), (hidden, d)))
    layer = dlfs.Residual(
        (
            dlfs.LayerNorm(gamma, beta),
            dlfs.Dense(w1, b1),
            dlfs.GELU(approximate="none"),
            dlfs.Dense(w2, None),
        )
    )

    def ref(xt, g, b, w1t, b1t, w2t):
        h = F.layer_norm(xt, (d,), g, b, 1e-5)
        return xt + F.gelu(h @ w1t + b1t) @ w2t

    _layer_vs_torch(
        torch,
        layer,
        rng.standard_normal((3, 4, d)),
        ref,
        (gamma, beta, w1, b1, w2),
        rng,
        "Residual",
    )


def test_tied_embedding_matches_torch():
    """TiedEmbedding(w, (LayerNorm,)): logits = LN(w[ids]) w^T; the ONE w gets the
    sum of both uses' gradients, as nanoGPT's wte.weight = lm_head.weight."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(17)
    v, d, n, t = 11, 6, 3, 5
    w, gamma = rng.standard_normal((v, d)), 1 + 0.3 * rng.standard_normal(d)
    layer = dlfs.TiedEmbedding(w, (dlfs.LayerNorm(gamma),))
    assert len(layer.params()) == 2
    ids = rng.integers(0, v, (n, t))
    y, cache, _ = layer.forward(ids)
    wt, gt = _t(torch, w), _t(torch, gamma)
    yt = F.linear(F.layer_norm(F.embedding(torch.from_numpy(ids), wt), (d,), gt, None, 1e-5), wt)
    _close(y, yt, "TiedEmbedding logits")
    dy = rng.standard_normal(y.shape)
    (yt * torch.from_numpy(dy)).sum().backward()
    _, (dw, dgamma) = layer.backward(cache, dy)
    _close(dw, wt.grad, "TiedEmbedding dw (both uses)")
    _close(dgamma, gt.grad, "TiedEmbedding d gamma")


# ------------------------------------------------------------ a whole GPT


def _gpt(seed: int, v: int, t: int, d: int, n_layer: int, n_heads: int, bias: bool):
    """api22's baby-GPT builder, at any size (float64)."""

    def block():
        return [
            dlfs.residual([dlfs.layer_norm(bias=bias), dlfs.self_attention(n_heads, bias=bias)]),
            dlfs.residual(
                [
                    dlfs.layer_norm(bias=bias),
                    dlfs.dense(4 * d, dlfs.GELU("none"), bias=bias),
                    dlfs.dense(d, bias=bias),
                ]
            ),
        ]

    body = [dlfs.positional_embedding(t)] + [la for _ in range(n_layer) for la in block()]
    return dlfs.network(
        seed,
        (t,),
        [dlfs.tied_embedding(v, d, [*body, dlfs.layer_norm(bias=bias)])],
        dlfs.SoftmaxCrossEntropy(),
        dtype=np.float64,
    )


def gpt_param_names(net) -> list[str]:
    """nanoGPT's state_dict names of ``net.params()[0]``, in order (a tied-embedding GPT)."""
    (tied,) = net.layers
    names, block = ["transformer.wte.weight"], -1

    def ln(layer, prefix):
        return [f"{prefix}.weight"] * (layer.gamma is not None) + [f"{prefix}.bias"] * (
            layer.beta is not None
        )

    for layer in tied.layers:
        if isinstance(layer, dlfs.PositionalEmbedding):
            names.append("transformer.wpe.weight")
        elif isinstance(layer, dlfs.LayerNorm):
            names += ln(layer, "transformer.ln_f")
        elif isinstance(layer, dlfs.Residual):
            subs = layer.layers
            attn = any(isinstance(s, dlfs.SelfAttention) for s in subs)
            block += attn
            p = f"transformer.h.{block}"
            denses = iter(["c_fc", "c_proj"])
            for s in subs:
                if isinstance(s, dlfs.LayerNorm):
                    names += ln(s, f"{p}.ln_1" if attn else f"{p}.ln_2")
                elif isinstance(s, dlfs.SelfAttention):
                    names += [f"{p}.attn.c_attn.weight"] + [f"{p}.attn.c_attn.bias"] * (
                        s.b_qkv is not None
                    )
                    names += [f"{p}.attn.c_proj.weight"] + [f"{p}.attn.c_proj.bias"] * (
                        s.b_o is not None
                    )
                elif isinstance(s, dlfs.Dense):
                    c = next(denses)
                    names += [f"{p}.mlp.{c}.weight"] + [f"{p}.mlp.{c}.bias"] * (s.b is not None)
                else:
                    assert not s.params(), f"unexpected parameters in {s!r}"
        else:
            assert not layer.params(), f"unexpected parameters in {layer!r}"
    assert len(names) == len(tied.params())
    return names


def torch_layout(name: str, a: np.ndarray) -> np.ndarray:
    """dlfs's array -> torch's: Linear weights are (out, in), the transpose of dlfs's."""
    return a.T if a.ndim == 2 and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc") else a


def _torch_gpt(torch, v: int, t: int, d: int, n_layer: int, n_heads: int, bias: bool):
    """nanoGPT's GPT (pre-LN, tied wte/lm_head, learned positions, dropout 0) as
    torch modules with its state_dict names, float64."""
    F = torch.nn.functional

    class _Attn(torch.nn.Module):
        def __init__(self, d, n_heads, bias):
            super().__init__()
            self.c_attn = torch.nn.Linear(d, 3 * d, bias=bias)
            self.c_proj = torch.nn.Linear(d, d, bias=bias)
            self.n_heads = n_heads

        def forward(self, x):
            n, t, d = x.shape
            q, k, v = (
                a.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                for a in self.c_attn(x).split(d, dim=2)
            )
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(n, t, d))

    class _Block(torch.nn.Module):
        def __init__(self, d, n_heads, bias):
            super().__init__()
            self.ln_1 = torch.nn.LayerNorm(d, bias=bias)
            self.attn = _Attn(d, n_heads, bias)
            self.ln_2 = torch.nn.LayerNorm(d, bias=bias)
            self.mlp = torch.nn.Sequential()
            self.mlp.add_module("c_fc", torch.nn.Linear(d, 4 * d, bias=bias))
            self.mlp.add_module("gelu", torch.nn.GELU())
            self.mlp.add_module("c_proj", torch.nn.Linear(4 * d, d, bias=bias))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(torch.nn.Module):
        """nanoGPT's GPT (pre-LN, tied wte/lm_head, learned positions), dropout 0."""

        def __init__(self, v, t, d, n_layer, n_heads, bias):
            super().__init__()
            self.transformer = torch.nn.ModuleDict(
                dict(
                    wte=torch.nn.Embedding(v, d),
                    wpe=torch.nn.Embedding(t, d),
                    h=torch.nn.ModuleList(_Block(d, n_heads, bias) for _ in range(n_layer)),
                    ln_f=torch.nn.LayerNorm(d, bias=bias),
                )
            )
            self.lm_head = torch.nn.Linear(d, v, bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            tr = self.transformer
            x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
            for block in tr.h:
                x = block(x)
            logits = self.lm_head(tr.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return TorchGPT(v, t, d, n_layer, n_heads, bias).double()


@pytest.mark.parametrize("bias", [False, True])
def test_two_layer_gpt_loss_and_every_gradient_match_torch(bias):
    """api22's GPT builder (n_layer=2, D=16, 2 heads, T=8, V=11, float64), every
    weight redrawn at random, against a nanoGPT-style torch model holding the same
    weights: the loss and all gradients agree to 1e-10 (the tied matrix once)."""
    torch = _torch()
    v, t, d, n_layer, n_heads = 11, 8, 16, 2, 2
    rng = np.random.default_rng(19)
    net = _gpt(0, v, t, d, n_layer, n_heads, bias)
    names = gpt_param_names(net)
    fresh = [
        (
            1.0
            if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith("ln_f.weight")
            else 0.0
        )
        + 0.4 * rng.standard_normal(p.shape)
        for n, p in zip(names, net.params()[0])
    ]
    net = net.with_params((tuple(fresh),))
    model = _torch_gpt(torch, v, t, d, n_layer, n_heads, bias)
    own = dict(model.named_parameters())
    assert sorted(own) == sorted(names)  # the tied matrix is one parameter on both sides
    with torch.no_grad():
        for n, a in zip(names, fresh):
            own[n].copy_(torch.from_numpy(np.ascontiguousarray(torch_layout(n, a))))

    x = rng.integers(0, v, (3, t))
    y = rng.integers(0, v, (3, t))
    loss, grads, _ = net.loss_and_grads(x, y)
    loss_t = model(torch.from_numpy(x), torch.from_numpy(y))
    loss_t.backward()
    _close(np.float64(loss), loss_t, "GPT loss")
    assert len(grads) == 1 and len(grads[0]) == len(names)
    for n, g in zip(names, grads[0]):
        _close(g, torch_layout(n, own[n].grad.numpy()), f"GPT grad of {n}")


def test_two_layer_gpt_training_steps_match_torch():
    """Three ``train_step``s with chain(ClipByGlobalNorm(1), AdamW(weight_decay_mask=
    "matrices")) == torch.optim.AdamW with nanoGPT's two param groups (decay on
    ndim >= 2) after clip_grad_norm_(1.0): every step's loss and the final weights."""
    torch = _torch()
    v, t, d, n_layer, n_heads = 11, 8, 16, 2, 2
    rng = np.random.default_rng(23)
    net = _gpt(0, v, t, d, n_layer, n_heads, False)
    names = gpt_param_names(net)
    fresh = [
        (1.0 if p.ndim == 1 else 0.0) + 0.4 * rng.standard_normal(p.shape) for p in net.params()[0]
    ]
    net = net.with_params((tuple(fresh),))
    model = _torch_gpt(torch, v, t, d, n_layer, n_heads, False)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for n, a in zip(names, fresh):
            own[n].copy_(torch.from_numpy(np.ascontiguousarray(torch_layout(n, a))))
    lr, wd = 1e-2, 0.1
    groups = [
        {"params": [p for p in own.values() if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in own.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt_t = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)
    adamw = dlfs.AdamW(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd, weight_decay_mask="matrices")
    state = dlfs.TrainState.create(net, dlfs.chain(dlfs.ClipByGlobalNorm(1.0), adamw), key=0)
    norms = []
    for _ in range(3):
        x, y = rng.integers(0, v, (4, t)), rng.integers(0, v, (4, t))
        before = state.loss_sum
        state = dlfs.train_step(state, (x, y))
        loss_t = model(torch.from_numpy(x), torch.from_numpy(y))
        loss_t.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        _close(np.float64((state.loss_sum - before) / len(x)), loss_t, "GPT step loss")
    assert max(norms) > 1.0  # the clipping acted
    for n, p in zip(names, state.net.params()[0]):
        _close(p, torch_layout(n, own[n].detach().numpy()), f"GPT weight {n} after 3 steps")
