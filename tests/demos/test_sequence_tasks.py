"""The generated sequence tasks: labels are right on hand-checked examples, deterministic, balanced."""

from __future__ import annotations

import pytest
import torch

from attnzoo.demos.sequence_tasks import CLS, PAD, evaluate_listops, listops, make_task, retrieval


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("MAX 2 9 MIN 4 7 ] 0 ]", 9),
        ("MIN 3 MAX 1 8 ] ]", 3),
        ("MED 5 1 9 ]", 5),
        ("MED 4 1 9 2 ]", 2),  # the lower median of an even count (1 2 4 9)
        ("SM 7 8 9 ]", 4),  # 24 mod 10
        ("SM MAX 9 9 ] MIN 9 3 ] ]", 2),  # 9 + 3 = 12 -> 2
        ("7", 7),
    ],
)
def test_listops_values_by_hand(expression: str, value: int) -> None:
    assert evaluate_listops(expression.split()) == value


def test_listops_rejects_unbalanced_expressions() -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        evaluate_listops("MAX 1 2".split())


def test_listops_sequences_decode_to_their_labels() -> None:
    task = listops(48, 60, 20, seed=1)
    assert task.train_tokens.shape == (60, 48) and task.test_tokens.shape == (20, 48)
    for tokens, label in zip(task.train_tokens, task.train_labels):
        assert tokens[0] == CLS
        real = [task.vocab[i] for i in tokens[1:].tolist() if i != PAD]
        assert evaluate_listops(real) == label.item()
        # padding only at the end
        ids = tokens.tolist()
        first_pad = ids.index(PAD) if PAD in ids else len(ids)
        assert all(i == PAD for i in ids[first_pad:])
    assert len(set(task.train_labels.tolist())) >= 5  # many classes occur


def test_retrieval_label_is_whether_the_query_is_a_key() -> None:
    task = retrieval(40, 200, 50, seed=2, num_keys=4)
    for tokens, label in zip(task.train_tokens, task.train_labels):
        assert tokens[0] == CLS
        keys, query = set(tokens[1:5].tolist()), task.vocab[tokens[-1].item()]
        assert query.startswith("q")  # the query is a query token, q_i asks about k_i
        assert (task.vocab.index("k" + query[1:]) in keys) == bool(label)
        # the filler never uses key tokens, so only the first keys can answer
        assert not set(tokens[5:-1].tolist()) & set(range(2, 18))
    balance = task.train_labels.float().mean().item()
    assert 0.4 < balance < 0.6


def test_tasks_are_deterministic_and_seeds_differ() -> None:
    a, b, c = (make_task("retrieval", 32, 30, 10, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train_tokens, b.train_tokens) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_tokens, c.train_tokens)
    d, e = (make_task("listops", 32, 30, 10, seed=0) for _ in range(2))
    assert torch.equal(d.train_tokens, e.train_tokens)


def test_bad_task_arguments_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        make_task("parity", 32, 10, 10)
    with pytest.raises(ValueError, match="length: expected at least"):
        retrieval(5, 10, 10)
    with pytest.raises(ValueError, match="n_train, n_test"):
        listops(32, 0, 10)
