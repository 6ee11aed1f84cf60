import numpy as np
import pandas as pd
import pytest

from adaptive_attn import binding
from adaptive_attn.data.counting import counting_sample
from adaptive_attn.data.mqar import make_mqar
from adaptive_attn.data.synthetic import content_range
from adaptive_attn.data.votes import make_votes


def test_each_position_needs_its_earlier_positions_of_the_same_id():
    sample = {"need_id": np.array([0, 5, 7, 5, 0, 5, 7, 9, 0]), "target_mask": np.ones(9, dtype=bool), "task": 0}
    assert binding.position_needs(sample, count_cap=15)["need"].tolist() == [0, 0, 0, 1, 0, 2, 1, 0, 0]


def test_a_recall_query_needs_the_one_value_it_asks_for():
    """The value sits at an unscored position of the context: it is needed all the same."""
    make = make_mqar(128, 8192, 4, 16, 0.01)
    sample = {**make(np.random.default_rng(0)), "task": 0}
    needs = binding.position_needs(sample, count_cap=15)
    queries = sample["need_id"][needs["t"]] != 0
    assert queries.any() and (needs["need"][queries] == 1).all() and not needs["saturated"].any()


@pytest.mark.parametrize("alphabet", [2, 8])
def test_counting_needs_are_the_labels_the_generator_gives(alphabet):
    """The need read from need_id and the cap must reproduce the generator's own capped count."""
    cap, vocab = 5, 1024
    sample = {**counting_sample(np.random.default_rng(0), 96, vocab, alphabet, cap), "task": 1}
    needs = binding.position_needs(sample, cap)
    label = sample["targets"][needs["t"]] - content_range(vocab)[1]
    assert needs["need"].tolist() == label.tolist()
    assert needs["saturated"].tolist() == (label == cap).tolist()


def test_a_vote_share_needs_every_earlier_ballot_so_a_budget_binds_at_every_length():
    """Counting's cap frees long sequences from any budget of 10%; a vote share has no cap: the bound
    share at alphabet 2 stays put as the length grows, and the need passes any cap."""
    shares = []
    for seq_len in (64, 512):
        make = make_votes(seq_len, 1024, [2])
        frames = [binding.position_needs({**make(np.random.default_rng(i))}, count_cap=15) for i in range(8)]
        needs = pd.concat(frames)
        assert not needs["saturated"].any()
        shares.append(binding.bound_shares(needs, k=round(0.1 * seq_len), sink_tokens=1)["bound"])
    assert needs["need"].max() > 200 and min(shares) > 0.7 and abs(shares[0] - shares[1]) < 0.1


def test_a_position_is_bound_when_its_need_exceeds_the_room_beside_its_own_position_and_the_sinks():
    needs = pd.DataFrame({"t": [2, 10, 10, 10], "need": [3, 3, 2, 3], "saturated": [False, False, False, True]})
    # k=4, one sink: room for 2 others; t=2 sees its whole past (3 positions <= k)
    shares = binding.bound_shares(needs, k=4, sink_tokens=1)
    assert shares == {"saturated": 0.25, "bound": 0.5, "bound_unsaturated": 0.25}
    assert binding.bound_shares(needs, k=11, sink_tokens=1)["bound"] == 0.0  # everyone sees everything


def test_the_check_runs_from_a_config_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "binding.md"
    binding.main(["data=counting", "--lengths", "64", "--keeps", "0.1", "1.0", "--samples", "16", "--out", str(out)])
    table = out.read_text()
    assert table in capsys.readouterr().out
    rows = [r.split("|")[1:-1] for r in table.splitlines()[2:]]
    bound = {(int(r[1]), float(r[3])): float(r[6]) for r in rows}
    assert bound[(2, 0.1)] > 0.5  # alphabet 2 at k = 7: most positions need more
    assert all(v == 0 for (_, keep), v in bound.items() if keep == 1.0)


def test_the_check_refuses_data_without_a_ground_truth_of_need():
    with pytest.raises(SystemExit, match="data._target_=.*TextDataModule is invalid"):
        binding.main(["data=text", "--lengths", "64", "--samples", "1"])


@pytest.mark.parametrize(
    "args, message",
    [(["--keeps", "0"], "--keeps 0.0 is invalid: must be in \\(0, 1\\]"), (["--samples", "0"], "--samples 0")],
)
def test_bad_arguments_stop_the_check_before_any_work(args, message):
    with pytest.raises(SystemExit, match=message):
        binding.main(["data=counting", *args])
