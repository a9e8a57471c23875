"""The encoder classifier of `compare --task sequence`: every sequence mechanism plugs in, batch items
stay independent, and a known-good model solves the retrieval task at a short length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.demos.sequence_tasks import retrieval
from attnzoo.models.encoder import ENCODER_MECHANISMS, SequenceClassifier, attention_layer


@pytest.mark.parametrize("name", sorted(ENCODER_MECHANISMS))
def test_batch_items_are_independent_and_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(20, 3, 24, attention=name, embed_dim=16, num_heads=2).eval()
    tokens = torch.randint(1, 20, (3, 24), generator=torch.Generator().manual_seed(1))
    together = model(tokens)
    alone = torch.cat([model(tokens[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    model.train()
    model(tokens).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # padding_idx keeps the <pad> row of the embedding at zero gradient, which is not a row here
    assert not missing, f"{name}: no gradient reaches {missing}"


def test_graph_layer_span_nodes_start_as_token_means() -> None:
    layer = attention_layer("graph_self_attention", 8, 2, 6)
    seen = {}

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen["nodes"] = args[0]

    layer.attn.register_forward_pre_hook(record)
    x = torch.randn(2, 6, 8)
    layer(x)
    nodes = seen["nodes"].view(2, -1, 8)
    graph = layer._graph(6, x.device)
    torch.testing.assert_close(nodes[:, :6], x)
    # level 1 spans cover token pairs (0,1), (2,3), (4,5); the root covers all six
    level1 = graph.level_offsets[1]
    torch.testing.assert_close(nodes[:, level1], x[:, 0:2].mean(1))
    torch.testing.assert_close(nodes[:, level1 + 2], x[:, 4:6].mean(1))
    torch.testing.assert_close(nodes[:, -1], x.mean(1))


def test_unknown_mechanism_and_bad_tokens_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="expected a sequence self-attention mechanism"):
        SequenceClassifier(10, 2, 8, attention="cbam")
    model = SequenceClassifier(10, 2, 8)
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="at most max_len=8"):
        model(torch.zeros(2, 9, dtype=torch.int64))


@pytest.mark.slow
def test_known_good_model_solves_short_retrieval() -> None:
    """mha reaches high accuracy at length 16 in a test-sized run: the task is solvable."""
    torch.manual_seed(0)
    task = retrieval(16, 2000, 300, seed=0, num_keys=2, key_vocab=8)
    model = SequenceClassifier(task.vocab_size, 2, 16, embed_dim=32, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        order = torch.randperm(len(task.train_labels), generator=generator)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            loss = F.cross_entropy(model(task.train_tokens[idx]), task.train_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(task.test_tokens).argmax(-1) == task.test_labels).float().mean().item()
    assert accuracy > 0.9, f"mha reached only {accuracy:.2f} on retrieval at length 16"
