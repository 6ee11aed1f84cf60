"""Evaluation metrics on hand-made cases with known answers: needed-key recall, slices, convergence."""

import pytest
import torch

from adaptive_attn.lit.convergence import ConvergenceTracker
from adaptive_attn.lit.metrics import EvalSlices


def test_needed_key_recall_counts_the_needed_positions_inside_the_selection():
    # sequence 0 (recall, 2 pairs): query 5 needs position 2, query 6 needs position 4
    # sequence 1 (counting, alphabet 2): symbol 7 at 1, 3, 6 -> query 3 needs {1}, query 6 needs {1, 3}
    need_id = torch.tensor([[0, 0, 1, 0, 2, 1, 2, 0], [0, 7, 9, 7, 9, 9, 7, 0]])
    scored = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    batch = {"need_id": need_id, "task": torch.tensor([0, 1]), "difficulty": torch.tensor([2, 2])}
    selected = torch.zeros(2, 8, 8, dtype=torch.bool)
    selected[0, 5, 2] = True  # recall: one of its two needed positions
    selected[1, 6, 3] = True  # counting: query 6 holds 3 but not 1; query 3 nothing
    selected[1, 4, 2] = True  # symbol 9: query 4 needs {2}: held; query 5 needs {2, 4}: none
    slices = EvalSlices()
    slices.update_needed_recall(batch, [selected], scored)
    got = slices.compute()
    # counting needs: q3 {1}, q4 {2}, q5 {2, 4}, q6 {1, 3} -> 6 positions, 2 held
    assert got["needed_recall/recall/pairs2-3"] == 0.5
    assert got["needed_recall/counting/alphabet2"] == pytest.approx(2 / 6)
    assert got["needed_recall"] == pytest.approx(3 / 8) == got["needed_recall/layer0"]


def test_slices_split_loss_and_accuracy_by_position_bucket_task_and_domain():
    scored = torch.zeros(2, 8, dtype=torch.bool)
    scored[0, [1, 7]] = True
    scored[1, [2]] = True
    batch = {"task": torch.tensor([0, 1]), "difficulty": torch.tensor([4, 16]), "domain": torch.tensor([2, 0])}
    slices = EvalSlices()
    slices.update(batch, losses=torch.tensor([1.0, 3.0, 5.0]), correct=torch.tensor([1.0, 0.0, 1.0]), scored=scored)
    got = slices.compute()
    assert got["loss/pos0"] == 1.0 and got["loss/pos3"] == 3.0 and got["loss/pos1"] == 5.0
    assert got["acc/recall/pairs4-7"] == 0.5 and got["acc/counting/alphabet16"] == 1.0
    assert got["loss/domain_repetitive"] == 2.0 and got["loss/domain_code"] == 5.0


def test_convergence_reads_first_crossings_and_the_area_under_the_curve():
    tracker = ConvergenceTracker(acc_levels=(0.5, 0.9), loss_levels=(1.0,))
    tracker.curve = [
        {"step": 0, "wall_s": 0.0, "acc": 0.1, "loss": 3.0},
        {"step": 100, "wall_s": 10.0, "acc": 0.6, "loss": 2.0},
        {"step": 200, "wall_s": 21.0, "acc": 0.95, "loss": 0.5},
        {"step": 300, "wall_s": 30.0, "acc": 0.92, "loss": 0.4},
    ]
    out = tracker.summary()
    assert (out["steps_to_acc_0.5"], out["wall_s_to_acc_0.5"]) == (100, 10.0)
    assert (out["steps_to_acc_0.9"], out["steps_to_loss_1.0"]) == (200, 200)
    assert out["val_acc_auc"] == pytest.approx(((0.1 + 0.6) + (0.6 + 0.95) + (0.95 + 0.92)) / 2 / 3)
    never = ConvergenceTracker(acc_levels=(0.99,)).summary()
    assert never["steps_to_acc_0.99"] is None
