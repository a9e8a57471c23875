"""ShowAttendTellCaptioner: the decoder against a float64 reference, its losses, and it learns."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from attnzoo.models.captioner import ShowAttendTellCaptioner
from attnzoo.sequence.show_attend_tell import doubly_stochastic_penalty
from attnzoo.testing import randomize_

pytestmark = pytest.mark.usefixtures("float64_default")

BOS, EOS, PAD = 1, 2, 0


perturbed = partial(randomize_, scale=0.3)


@torch.no_grad()
def reference(model, a, captions_in):
    """Xu et al. 2015, section 3.1.2 (eq. 1-7) with soft gated attention (4.2, 4.2.1)."""
    att = model.attention
    batch, steps = captions_in.shape
    logits = torch.zeros(batch, steps, model.vocab_size)
    alphas = torch.zeros(batch, steps, a.shape[1])
    for b in range(batch):
        mean = a[b].mean(0)
        h = torch.tanh(model.init_h.weight @ mean + model.init_h.bias)  # h_0 = f_init,h(mean a_i)
        c = torch.tanh(model.init_c.weight @ mean + model.init_c.bias)
        for t in range(steps):
            e = torch.stack([att.w @ torch.tanh(att.w_a @ a_i + att.w_h @ h + att.b) for a_i in a[b]])
            alpha = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()  # from h_{t-1}
            beta = torch.sigmoid(att.f_beta.weight[0] @ h + att.f_beta.bias[0])
            z = beta * (alpha[:, None] * a[b]).sum(0)
            y = model.embed.weight[captions_in[b, t]]
            x = torch.cat([y, z])
            cell = model.cell
            i, f, g, o = (cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ h + cell.bias_hh).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            deep = y + model.out_h.weight @ h + model.out_h.bias + model.out_z.weight @ z  # eq. 7
            logits[b, t] = model.out.weight @ deep + model.out.bias
            alphas[b, t] = alpha
    return logits, alphas


def test_soft_decoder_matches_float64_reference():
    torch.manual_seed(0)
    model = perturbed(ShowAttendTellCaptioner(9, 5, hidden=6, embed_dim=4, attn_dim=7)).eval()
    features = torch.randn(2, 5, 2, 3)  # (B, D, H, W): L = 6 locations
    captions_in = torch.randint(3, 9, (2, 4))
    expected_logits, expected_alpha = reference(model, features.flatten(2).transpose(1, 2), captions_in)
    logits, maps = model(features, captions_in)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["alpha"], expected_alpha, rtol=1e-10, atol=1e-10)
    assert maps["beta"].shape == (2, 4, 1)


def test_greedy_decode_agrees_with_teacher_forcing():
    model = perturbed(ShowAttendTellCaptioner(9, 5, hidden=6), scale=0.6).eval()
    features = torch.randn(3, 7, 5)
    tokens, alpha = model.greedy_decode(features, max_len=6, bos=BOS, eos=EOS)
    assert alpha.shape == (3, tokens.shape[1], 7)
    logits, maps = model(features, torch.cat([torch.full((3, 1), BOS), tokens[:, :-1]], 1))
    for b in range(3):
        ended = (tokens[b] == EOS).nonzero()
        stop = int(ended[0]) + 1 if len(ended) else tokens.shape[1]
        assert torch.equal(logits[b, :stop].argmax(-1), tokens[b, :stop])
        torch.testing.assert_close(alpha[b, :stop], maps["alpha"][b, :stop])
        assert torch.all(alpha[b, stop:] == 0)


def test_soft_loss_is_caption_nll_plus_doubly_stochastic_penalty():
    model = perturbed(ShowAttendTellCaptioner(9, 5, hidden=6, penalty=0.5))
    features = torch.randn(2, 7, 5)
    captions_in = torch.tensor([[BOS, 4, 5, 6], [BOS, 7, 8, PAD]])
    captions_out = torch.tensor([[4, 5, 6, EOS], [7, 8, EOS, PAD]])
    result = model.loss(features, captions_in, captions_out)
    logits, maps = model(features, captions_in)
    mask = captions_out != PAD
    word_nll = F.cross_entropy(logits.transpose(1, 2), captions_out, reduction="none")
    nll = (word_nll * mask).sum(1).mean()  # -log p(y|a), summed over the words of a caption
    penalty = doubly_stochastic_penalty(maps["alpha"], 0.5, mask=mask)
    torch.testing.assert_close(result["nll"], nll)
    torch.testing.assert_close(result["penalty"], penalty)
    torch.testing.assert_close(result["loss"], nll + penalty)
    assert penalty > 0


def test_hard_loss_trains_the_attention_by_reinforce_and_updates_the_baseline():
    torch.manual_seed(0)
    model = perturbed(ShowAttendTellCaptioner(9, 5, hidden=6, mode="hard", gate=False)).train()
    features = torch.randn(8, 7, 5)
    captions_in = torch.randint(3, 9, (8, 4))
    captions_out = torch.randint(3, 9, (8, 4))
    assert model.penalty == 0 and model.baseline.value.item() == 0
    result = model.loss(features, captions_in, captions_out)
    result["loss"].backward()
    assert model.attention.w_a.grad.abs().sum() > 0
    assert result["baseline"].item() == pytest.approx(0.1 * -result["nll"].item())
    _, maps = model(features, captions_in)
    assert {"location", "log_prob", "entropy"} <= set(maps)
    model.eval()  # eval: deterministic expectation, no REINFORCE terms
    _, maps = model(features, captions_in)
    assert "location" not in maps


def test_bad_inputs():
    model = ShowAttendTellCaptioner(9, 5, hidden=6)
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(2, 7, 4), torch.randint(3, 9, (2, 4)))
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(2, 7, 5), torch.rand(2, 4))
    with pytest.raises(ValueError, match="B=2"):
        model(torch.randn(2, 7, 5), torch.randint(3, 9, (3, 4)))
    with pytest.raises(ValueError, match="captions_out"):
        model.loss(torch.randn(2, 7, 5), torch.randint(3, 9, (2, 4)), torch.randint(3, 9, (2, 3)))


# ---------------------------------------------------------------------------- it learns


def reading_batch(n, generator, symbols=5, locations=4):
    """An 'image' of 4 locations, each a symbol (one-hot) and its place (one-hot); the caption
    reads the symbols from left to right. Step t must attend to location t."""
    symbol = torch.randint(0, symbols, (n, locations), generator=generator)
    features = torch.cat(
        [F.one_hot(symbol, symbols), torch.eye(locations).expand(n, locations, locations)], -1
    ).float()
    words = symbol + 3  # ids 0, 1, 2 are PAD, BOS, EOS
    captions_out = torch.cat([words, torch.full((n, 1), EOS)], 1)
    captions_in = torch.cat([torch.full((n, 1), BOS), words], 1)
    return features, captions_in, captions_out


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_soft_attention_learns_to_read_left_to_right(one_thread):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = ShowAttendTellCaptioner(8, 9, hidden=32, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(80):
        features, captions_in, captions_out = reading_batch(32, generator)
        loss = model.loss(features, captions_in, captions_out)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    features, _, captions_out = reading_batch(200, generator)
    tokens, alpha = model.greedy_decode(features, max_len=5, bos=BOS, eos=EOS)
    assert tokens.shape == (200, 5)
    correct = (tokens == captions_out).all(1).double().mean()
    assert correct > 0.8, f"read {correct:.0%} of the captions right"
    on_target = alpha[:, :4].diagonal(dim1=1, dim2=2).mean()  # step t on location t
    assert on_target > 0.6, f"attention on the location being read: {on_target:.2f}"


@pytest.mark.slow
def test_hard_attention_learns_with_reinforce(one_thread):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = ShowAttendTellCaptioner(8, 9, hidden=32, mode="hard", dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        features, captions_in, captions_out = reading_batch(32, generator)
        loss = model.loss(features, captions_in, captions_out)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.baseline.value < 0  # tracks the (negative) caption log-likelihood
    model.eval()
    features, _, captions_out = reading_batch(200, generator)
    tokens, alpha = model.greedy_decode(features, max_len=5, bos=BOS, eos=EOS)
    on_target = alpha[:, :4].diagonal(dim1=1, dim2=2).mean()
    assert on_target > 0.45, f"attention on the location being read: {on_target:.2f} (uniform: 0.25)"
    assert (tokens == captions_out).all(1).double().mean() > 0.3  # chance: 5^-4
