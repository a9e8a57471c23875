"""Seq2Seq: decoders against float64 references written from the papers, and the wiring learns."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from attnzoo.models.seq2seq import Seq2Seq
from attnzoo.testing import randomize_

pytestmark = pytest.mark.usefixtures("float64_default")

BOS, EOS, PAD = 1, 2, 0


perturbed = partial(randomize_, scale=0.3)


def example(batch=3, length=6, steps=4, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (batch, length), generator=g)
    lengths = torch.tensor([length, 3, 1][:batch])
    src_mask = torch.arange(length) < lengths[:, None]
    src = src.masked_fill(~src_mask, PAD)
    tgt_in = torch.randint(3, vocab, (batch, steps), generator=g)
    tgt_in[:, 0] = BOS
    return src, src_mask, tgt_in


def softmax(values):
    e = torch.exp(values - values.max())
    return e / e.sum()


def gru_cell(x, h, rnn):
    """torch's GRU equations (gates r, z, n), written out."""
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
    (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3), gh.chunk(3)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def lstm_cell(x, h, c, rnn):
    gates = rnn.weight_ih_l0 @ x + rnn.bias_ih_l0 + rnn.weight_hh_l0 @ h + rnn.bias_hh_l0
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@torch.no_grad()
def bahdanau_reference(model, src, src_mask, tgt_in):
    """RNNsearch, Bahdanau et al. 2014, section 3 and appendix A, one sentence at a time."""
    hidden, att = model.hidden, model.attention
    logits, maps = [], []
    for b in range(src.shape[0]):
        n = int(src_mask[b].sum())
        h, _ = model.encoder(model.src_embed(src[b : b + 1, :n]))  # annotations [fwd; bwd], (1, n, 2H)
        h = h[0]
        s = torch.tanh(model.bridge_h.weight @ h[0, hidden:])  # s_0 = tanh(W_s h<-_1)
        sentence_logits, sentence_maps = [], []
        for i in range(tgt_in.shape[1]):
            e = torch.stack([att.v_a @ torch.tanh(att.w_a @ s + att.u_a @ h[j]) for j in range(n)])
            alpha = softmax(e)  # the query is s_{i-1}
            c = (alpha[:, None] * h).sum(0)
            y = model.tgt_embed.weight[tgt_in[b, i]]
            s = gru_cell(torch.cat([y, c]), s, model.decoder)  # s_i = f(s_{i-1}, y_{i-1}, c_i)
            t_tilde = model.readout.weight @ torch.cat([s, y, c]) + model.readout.bias
            t = t_tilde.view(-1, 2).max(-1).values  # maxout over pairs
            sentence_logits.append(model.generator.weight @ t + model.generator.bias)
            sentence_maps.append(F.pad(alpha, (0, src.shape[1] - n)))
        logits.append(torch.stack(sentence_logits))
        maps.append(torch.stack(sentence_maps))
    return torch.stack(logits), torch.stack(maps)


@torch.no_grad()
def luong_reference(model, src, src_mask, tgt_in):
    """Luong et al. 2015, global attention, general score, input feeding, sections 3.1 and 3.3."""
    att = model.attention
    logits, maps = [], []
    for b in range(src.shape[0]):
        n = int(src_mask[b].sum())
        hs, (h, c) = model.encoder(model.src_embed(src[b : b + 1, :n]))
        hs, h, c = hs[0], h[0, 0], c[0, 0]  # the decoder starts from the encoder's final state
        feed = torch.zeros(model.hidden)  # h~_0 = 0
        sentence_logits, sentence_maps = [], []
        for t in range(tgt_in.shape[1]):
            y = model.tgt_embed.weight[tgt_in[b, t]]
            h, c = lstm_cell(torch.cat([y, feed]), h, c, model.decoder)  # input feeding
            a = softmax(torch.stack([h @ att.w_a @ hs[s] for s in range(n)]))  # query: current h_t
            context = (a[:, None] * hs).sum(0)
            feed = torch.tanh(att.w_c.weight @ torch.cat([context, h]))  # h~_t
            sentence_logits.append(model.generator.weight @ feed + model.generator.bias)
            sentence_maps.append(F.pad(a, (0, src.shape[1] - n)))
        logits.append(torch.stack(sentence_logits))
        maps.append(torch.stack(sentence_maps))
    return torch.stack(logits), torch.stack(maps)


def test_bahdanau_matches_float64_reference():
    torch.manual_seed(0)
    model = perturbed(Seq2Seq(11, 13, hidden=6, embed_dim=5, attn_dim=7, attention="bahdanau")).eval()
    assert model.cell == "gru" and model.bidirectional  # RNNsearch: a bidirectional GRU
    src, src_mask, tgt_in = example()
    expected_logits, expected_attn = bahdanau_reference(model, src, src_mask, tgt_in)
    logits, attn = model(src, src_mask, tgt_in)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, expected_attn, rtol=1e-10, atol=1e-10)


def test_luong_matches_float64_reference():
    torch.manual_seed(0)
    model = perturbed(Seq2Seq(11, 13, hidden=6, embed_dim=5, attention="luong", score="general")).eval()
    assert model.cell == "lstm" and not model.bidirectional and model.input_feeding
    assert model.bridge_h is None  # the decoder starts from the encoder's final state as is
    src, src_mask, tgt_in = example()
    expected_logits, expected_attn = luong_reference(model, src, src_mask, tgt_in)
    logits, attn = model(src, src_mask, tgt_in)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, expected_attn, rtol=1e-10, atol=1e-10)


def capture_queries_and_states(model, src, src_mask, tgt_in):
    queries, states = [], []
    hooks = [
        model.attention.register_forward_hook(lambda m, args, out: queries.append(args[0])),
        model.decoder.register_forward_hook(lambda m, args, out: states.append(out[0][:, 0])),
    ]
    with torch.no_grad():
        model(src, src_mask, tgt_in)
        _, initial = model.encode(src, src_mask)
    for hook in hooks:
        hook.remove()
    initial = initial[0] if isinstance(initial, tuple) else initial
    return queries, states, initial[-1]


def test_bahdanau_query_is_the_previous_decoder_state():
    model = perturbed(Seq2Seq(11, 13, hidden=6, attention="bahdanau"))
    queries, states, s_0 = capture_queries_and_states(model, *example())
    assert len(queries) == len(states) == 4
    torch.testing.assert_close(queries[0], s_0)
    for i in range(1, 4):
        torch.testing.assert_close(queries[i], states[i - 1])  # s_{i-1}, not s_i
        assert not torch.allclose(queries[i], states[i])


@pytest.mark.parametrize("attention", ["luong", "luong_local"])
def test_luong_query_is_the_current_decoder_state(attention):
    model = perturbed(Seq2Seq(11, 13, hidden=6, attention=attention))
    queries, states, _ = capture_queries_and_states(model, *example())
    assert len(queries) == len(states) == 4
    for t in range(4):
        torch.testing.assert_close(queries[t], states[t])  # h_t after this step's update


def test_input_feeding_feeds_the_previous_attentional_state():
    fed = Seq2Seq(11, 13, hidden=6, embed_dim=5, attention="luong")
    plain = Seq2Seq(11, 13, hidden=6, embed_dim=5, attention="luong", input_feeding=False)
    assert fed.decoder.input_size == 5 + 6 and plain.decoder.input_size == 5
    bahdanau = Seq2Seq(11, 13, hidden=6, embed_dim=5, attention="bahdanau")
    assert not bahdanau.input_feeding and bahdanau.decoder.input_size == 5 + 12  # [E y; c], c 2n wide
    # with feeding, the first step sees h~_0 = 0: zeroing the feed weights changes nothing at t = 0
    model = perturbed(fed).eval()
    src, src_mask, tgt_in = example()
    logits, _ = model(src, src_mask, tgt_in)
    with torch.no_grad():
        model.decoder.weight_ih_l0[:, 5:] = 0
    changed, _ = model(src, src_mask, tgt_in)
    torch.testing.assert_close(changed[:, 0], logits[:, 0])
    assert not torch.allclose(changed[:, 1:], logits[:, 1:])


CONFIGS = [
    {"attention": "bahdanau"},
    {"attention": "bahdanau", "cell": "lstm", "num_layers": 2},
    {"attention": "luong", "score": "general", "bidirectional": True},
    {"attention": "luong", "score": "concat", "cell": "gru"},
    {"attention": "luong", "input_feeding": False, "num_layers": 2},
    {"attention": "luong_local", "local_mode": "local-p", "window": 1},
    {"attention": "luong_local", "local_mode": "local-m", "window": 1, "input_feeding": False},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_padding_changes_nothing(config):
    model = perturbed(Seq2Seq(11, 13, hidden=6, **config)).eval()
    src, src_mask, tgt_in = example()
    logits, attn = model(src, src_mask, tgt_in)
    assert logits.shape == (3, 4, 13) and attn.shape == (3, 4, 6)
    assert torch.all(attn[1, :, 3:] == 0) and torch.all(attn[2, :, 1:] == 0)
    for b, n in ((1, 3), (2, 1)):
        alone_logits, alone_attn = model(src[b : b + 1, :n], None, tgt_in[b : b + 1])
        torch.testing.assert_close(logits[b : b + 1], alone_logits)
        torch.testing.assert_close(attn[b : b + 1, :, :n], alone_attn)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_greedy_decode_agrees_with_teacher_forcing(config):
    model = perturbed(Seq2Seq(11, 13, hidden=6, **config), scale=0.5).eval()
    src, src_mask, _ = example()
    tokens, attn = model.greedy_decode(src, src_mask, max_len=5, bos=BOS, eos=EOS)
    assert tokens.shape[0] == 3 and tokens.shape[1] <= 5 and attn.shape == (3, tokens.shape[1], 6)
    tgt_in = torch.cat([torch.full((3, 1), BOS), tokens[:, :-1]], 1)
    logits, forced_attn = model(src, src_mask, tgt_in)
    for b in range(3):
        ended = (tokens[b] == EOS).nonzero()
        stop = int(ended[0]) + 1 if len(ended) else tokens.shape[1]
        assert torch.equal(logits[b, :stop].argmax(-1), tokens[b, :stop])
        torch.testing.assert_close(attn[b, :stop], forced_attn[b, :stop])
        assert torch.all(tokens[b, stop:] == EOS) and torch.all(attn[b, stop:] == 0)


def test_local_attention_in_the_decoder():
    model = perturbed(Seq2Seq(11, 13, hidden=6, attention="luong_local", local_mode="local-m", window=1))
    src = torch.randint(3, 11, (2, 9))
    _, attn = model(src, None, torch.randint(3, 11, (2, 5)))
    for t in range(5):  # local-m: step t attends to [t - D, t + D], softmax over the window
        assert set(attn[0, t].nonzero().flatten().tolist()) == {s for s in (t - 1, t, t + 1) if s >= 0}
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 5))
    model = perturbed(Seq2Seq(11, 13, hidden=6, attention="luong_local", window=2), scale=0.1)
    _, attn = model(src, None, torch.randint(3, 11, (2, 5)))
    assert torch.all(attn.sum(-1) < 1)  # local-p: the Gaussian is not renormalised
    assert torch.all((attn > 0).sum(-1) <= 5)


def test_bad_inputs():
    model = Seq2Seq(11, 13, hidden=6)
    src, src_mask, tgt_in = example()
    with pytest.raises(TypeError, match="integer"):
        model(src.double(), src_mask, tgt_in)
    with pytest.raises(ValueError, match="expected batch"):
        model(src, src_mask, tgt_in[:2])
    left_padded = src_mask.flip(-1)
    with pytest.raises(ValueError, match="right padding"):
        model(src, left_padded, tgt_in)
    empty = src_mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="at least one"):
        model(src, empty, tgt_in)
    with pytest.raises(TypeError, match="bool"):
        model(src, src_mask.long(), tgt_in)
    with pytest.raises(ValueError, match="empty"):
        model(src, src_mask, tgt_in[:, :0])
    with pytest.raises(ValueError, match="attention"):
        Seq2Seq(11, 13, attention="transformer")
    with pytest.raises(ValueError, match="score"):
        Seq2Seq(11, 13, attention="bahdanau", score="dot")
    with pytest.raises(ValueError, match="score"):
        Seq2Seq(11, 13, attention="luong", bidirectional=True)  # dot cannot compare n with 2n
    with pytest.raises(ValueError, match="cell"):
        Seq2Seq(11, 13, cell="rnn")


# ---------------------------------------------------------------------------- it learns


def reverse_batch(n, generator, vocab=8):
    """Reverse 2-4 symbols: src 'a b c' -> target 'c b a EOS'; teacher forcing input 'BOS c b a'."""
    lengths = torch.randint(2, 5, (n,), generator=generator)
    width = int(lengths.max())
    mask = torch.arange(width) < lengths[:, None]
    src = torch.randint(3, vocab, (n, width), generator=generator).masked_fill(~mask, PAD)
    index = (lengths[:, None] - 1 - torch.arange(width)).clamp(min=0)
    target = torch.cat([src.gather(1, index).masked_fill(~mask, PAD), torch.full((n, 1), PAD)], 1)
    target[torch.arange(n), lengths] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), target[:, :-1]], 1)
    return src, mask, tgt_in, target


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def train_reverse(config, steps, seed=0):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Seq2Seq(8, 8, hidden=32, padding_idx=PAD, dtype=torch.float32, **config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        src, mask, tgt_in, target = reverse_batch(32, generator)
        logits, _ = model(src, mask, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, 8), target.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    src, mask, _, target = reverse_batch(200, generator)
    tokens, attn = model.greedy_decode(src, mask, max_len=5, bos=BOS, eos=EOS)
    tokens = F.pad(tokens, (0, 5 - tokens.shape[1]), value=EOS)
    correct = ((tokens == target) | (target == PAD)).all(1).double().mean().item()
    return correct, mask, attn


def anti_diagonal_mass(mask, attn):
    """Attention on the reversed source position: step t of a length-n source should read n-1-t."""
    lengths = mask.sum(1)
    mass = []
    for b in range(mask.shape[0]):
        n = int(lengths[b])
        mass.extend(attn[b, t, n - 1 - t].item() for t in range(n))
    return sum(mass) / len(mass)


@pytest.mark.parametrize(
    ("config", "steps", "min_mass"),
    [
        # the paper's init (v_a = 0) starts from uniform attention and needs more steps; the
        # bidirectional encoder also carries word order, so its alignments are less crisp
        ({"attention": "bahdanau", "attention_init": "xavier"}, 80, 0.4),
        ({"attention": "luong"}, 80, 0.6),
        pytest.param({"attention": "luong_local", "local_mode": "local-m"}, 80, None, marks=pytest.mark.slow),
        pytest.param({"attention": "luong_local"}, 80, None, marks=pytest.mark.slow),
        pytest.param({"attention": "luong", "input_feeding": False}, 80, 0.6, marks=pytest.mark.slow),
    ],
    ids=["bahdanau", "luong", "local-m", "local-p", "luong-no-feeding"],
)
def test_learns_to_reverse_short_sequences(one_thread, config, steps, min_mass):
    correct, mask, attn = train_reverse(config, steps)
    assert correct > 0.7, f"greedy decoding reversed only {correct:.0%} of the sequences"
    if min_mass is not None:  # (the windows of local-m cannot reach the far end)
        mass = anti_diagonal_mass(mask, attn)
        # uniform attention would put 1/3 on the aligned word on average
        assert mass > min_mass, f"attention on the aligned (reversed) word: {mass:.2f}"
