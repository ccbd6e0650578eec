"""The Hebb-Rosenblatt memory against hand-worked numbers (Eq. 2)."""

import pytest
import torch

from stawm import HebbRosenblatt


def memory(**kw):
    return HebbRosenblatt(2, delta=0.2, eta=0.4, theta=0.5, **kw)


def test_update_matches_hand_worked_eq2():
    # W e = [1, 6] (Eq. 2 as the main text and the authors' code write it; W^T e would be [5, 4]);
    # + theta e = [1.5, 7]; ReLU6 -> [1.5, 6] (saturates)
    # increment[i][j] = 0.4 * e_i * post_j = [[0.6, 2.4], [1.2, 4.8]]; decay 0.2 W = [[0.2, 0], [0.4, 0.4]]
    W = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])
    e = torch.tensor([[1.0, 2.0]])
    expected = torch.tensor([[[1.4, 2.4], [2.8, 6.4]]])
    torch.testing.assert_close(memory().update(W, e), expected)


def test_update_from_empty_memory_is_the_rosenblatt_term():
    # W = 0: post = ReLU6(theta e) = [0.5, 1]; increment = 0.4 * [[0.5, 1], [1, 2]]
    mem = memory()
    W = mem.init_state(1)
    assert W.shape == (1, 2, 2) and W.abs().sum() == 0
    torch.testing.assert_close(mem.update(W, torch.tensor([[1.0, 2.0]])), torch.tensor([[[0.2, 0.4], [0.4, 0.8]]]))


def test_zero_theta_and_empty_memory_learn_nothing():
    mem = HebbRosenblatt(3, theta=0.0)
    W = mem.init_state(2)
    assert mem.update(W, torch.rand(2, 3)).abs().sum() == 0


def test_read_leaves_out_theta():
    # W q = [1.4 + 2.4, 2.8 + 6.4] = [3.8, 9.2] -> ReLU6 -> [3.8, 6.0]; with theta q it would be 4.3
    W = torch.tensor([[[1.4, 2.4], [2.8, 6.4]]])
    torch.testing.assert_close(memory().read(W, torch.tensor([[1.0, 1.0]])), torch.tensor([[3.8, 6.0]]))


def test_batch_entries_are_independent():
    mem = memory()
    W = torch.rand(3, 2, 2)
    e = torch.rand(3, 2)
    together = mem.update(W, e)
    for b in range(3):
        torch.testing.assert_close(together[b], mem.update(W[b : b + 1], e[b : b + 1])[0])


def test_rates_and_state_follow_dtype():
    mem = memory().double()
    assert mem.init_state(4).dtype == torch.float64
    assert mem.rates() == pytest.approx({"delta": 0.2, "eta": 0.4, "theta": 0.5})


def test_gradients_reach_rates_only_when_learnable():
    for learnable in (True, False):
        e = torch.rand(4, 2, requires_grad=True)  # the rest of the model sits upstream of e
        mem = memory(learnable=learnable)
        W = mem.init_state(4)
        for _ in range(3):
            W = mem.update(W, e)
        mem.read(W, torch.rand(4, 2)).sum().backward()
        assert e.grad is not None
        params = dict(mem.named_parameters())
        if learnable:
            assert set(params) == {"delta", "eta", "theta"}
            assert all(p.grad is not None and p.grad.abs() > 0 for p in params.values())
        else:
            assert params == {}
            assert {n for n, _ in mem.named_buffers()} == {"delta", "eta", "theta"}


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation='tanh'"):
        HebbRosenblatt(4, activation="tanh")
