"""Synthetic tasks: the generators' answers and ground-truth needs checked by brute force, the mixture, the
stream of fresh training samples, and bad task parameters."""

import numpy as np
import pytest
import torch

from adaptive_attn.data.counting import counting_sample
from adaptive_attn.data.datamodule import SyntheticDataModule
from adaptive_attn.data.mqar import mqar_sample
from adaptive_attn.data.synthetic import COUNT_BOS, COUNT_LABELS, RECALL_BOS, VOTES_BOS, needed_mask
from adaptive_attn.data.votes import ballot_range, votes_sample
from adaptive_attn.lit.module import IGNORE, split_batch

V = 512


@pytest.mark.parametrize("seed", range(20))
def test_mqar_answers_and_needs_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, n = 128, int(rng.integers(1, 33))
    s = mqar_sample(rng, L, V, n)
    tokens, targets, scored = s["tokens"], s["targets"], s["target_mask"]
    assert tokens[0] == RECALL_BOS and tokens.shape == (L + 1,) and targets.shape == scored.shape == (L,)
    context = {int(tokens[1 + 2 * i]): (int(tokens[2 + 2 * i]), 2 + 2 * i) for i in range(n)}
    assert len(context) == n and min(context) >= 2 and max(v for v, _ in context.values()) < V - COUNT_LABELS
    queries = np.flatnonzero(scored)
    assert sorted(int(tokens[t]) for t in queries) == sorted(context)  # every key asked once, after the context
    assert (queries > 2 * n).all()
    need = needed_mask(torch.as_tensor(s["need_id"])[None], torch.as_tensor(scored)[None])[0]
    for t in queries:
        value, position = context[int(tokens[t])]
        assert targets[t] == value and need[t].nonzero().flatten().tolist() == [position]
    assert not need[~torch.as_tensor(scored)].any()


@pytest.mark.parametrize("m", [1, 2, 5, 32])
def test_counting_labels_and_needs_by_brute_force(m):
    rng = np.random.default_rng(m)
    L = 100
    s = counting_sample(rng, L, V, m, cap=15)
    tokens, targets = s["tokens"], s["targets"]
    assert tokens[0] == COUNT_BOS and len(set(tokens[1:].tolist())) <= m
    need = needed_mask(torch.as_tensor(s["need_id"])[None], torch.as_tensor(s["target_mask"])[None])[0]
    assert not s["target_mask"][0]
    for t in range(1, L):
        earlier = [u for u in range(1, t) if tokens[u] == tokens[t]]
        assert targets[t] == V - COUNT_LABELS + min(len(earlier), 15)
        assert need[t].nonzero().flatten().tolist() == earlier


@pytest.mark.parametrize("m", [1, 2, 7, 32])
def test_vote_shares_and_needs_by_brute_force(m):
    rng = np.random.default_rng(m)
    L = 200
    s = votes_sample(rng, L, V, m)
    tokens, targets = s["tokens"], s["targets"]
    lo, hi = ballot_range(V)
    assert tokens[0] == VOTES_BOS and lo <= tokens[1:].min() and tokens[1:].max() < hi
    keys = (tokens - lo) // 2
    assert len(set(keys[1:].tolist())) <= m
    need = needed_mask(torch.as_tensor(s["need_id"])[None], torch.as_tensor(s["target_mask"])[None])[0]
    assert not s["target_mask"][0]
    for t in range(1, L):
        ballots = [u for u in range(1, t + 1) if keys[u] == keys[t]]
        ones = sum((tokens[u] - lo) % 2 for u in ballots)
        assert targets[t] == hi + int(np.floor(15 * ones / len(ballots) + 0.5))
        assert need[t].nonzero().flatten().tolist() == ballots[:-1]


def test_votes_draw_a_bias_per_key():
    """Shares spread over the whole range: keys lean to 0, to 1, or neither."""
    s = votes_sample(np.random.default_rng(0), 2000, V, 8)
    final = {}
    for t in range(1, 2000):
        final[int(s["need_id"][t])] = int(s["targets"][t] - ballot_range(V)[1])
    assert min(final.values()) <= 4 and max(final.values()) >= 11


def test_mixture_carries_task_and_difficulty_and_streams_fresh_samples():
    dm = SyntheticDataModule(seq_len=64, vocab_size=V, task="recall_count", batch_size=16, train_steps=4)
    torch.manual_seed(0)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["task"].tolist()) == {0, 1}
    recall, counting = batch["task"] == 0, batch["task"] == 1
    assert (batch["tokens"][recall, 0] == RECALL_BOS).all() and (batch["tokens"][counting, 0] == COUNT_BOS).all()
    assert set(batch["difficulty"][counting].tolist()) <= {2, 4, 8, 16, 32}
    assert (batch["difficulty"][recall] <= 16).all()
    _, targets = split_batch(batch)
    assert torch.equal(targets != IGNORE, batch["target_mask"])
    train = dm.splits["train"]
    assert len(train) == 16 * 4 and not torch.equal(train[0]["tokens"], train[1]["tokens"])
    torch.manual_seed(1)  # another run seed: another training stream, the same validation set
    other = SyntheticDataModule(seq_len=64, vocab_size=V, task="recall_count", batch_size=16, train_steps=4)
    other.setup()
    assert not torch.equal(other.splits["train"][0]["tokens"], train[0]["tokens"])
    assert torch.equal(other.splits["val"][3]["tokens"], dm.splits["val"][3]["tokens"])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(task="counting", alphabets=[0, 4]), "data.alphabets=[0, 4] is invalid"),
        (dict(task="counting", count_cap=0), "data.count_cap=0 is invalid: must be an integer in [1, 15]"),
        (
            dict(task="recall", max_pairs=17),
            "data.max_pairs=17 is invalid: must be an integer in [1, seq_len // 4 = 16]",
        ),
        (dict(task="recall", min_pairs=9, max_pairs=8), "data.min_pairs=9 is invalid"),
        (dict(task="recall", vocab_size=64), "data.vocab_size=64 is invalid: must be >= seq_len + 18"),
        (dict(task="votes", alphabets=[2, 600]), "data.alphabets=[2, 600] is invalid: each must be an integer in [1,"),
        (dict(task="sorting"), "data.task='sorting' is invalid"),
    ],
)
def test_bad_task_parameters_fail_in_one_line(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SyntheticDataModule(seq_len=64, **{"vocab_size": V, **kwargs})
    assert needle in str(err.value) and "\n" not in str(err.value)
