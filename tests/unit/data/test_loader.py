import numpy as np
import pytest
import torch

from cybertron.data.loader import PackedLoader, iter_eval_batches
from cybertron.errors import DataError

SEQ_LEN = 8
TOKENS = np.arange(203, dtype=np.uint16)  # token value == position: windows are easy to identify
N_SAMPLES = (len(TOKENS) - 1) // SEQ_LEN  # 25


def window_index(inputs: torch.Tensor) -> list[int]:
    """Which window each row is (its first token / seq_len, since token value == position)."""
    return (inputs[:, 0] // SEQ_LEN).tolist()


def reference_slots(seed: int, first: int, count: int) -> list[int]:
    """Independent restatement of the spec: slot s is perm_{s // n}[s % n], perm_e from rng([seed, e])."""
    perms = {}
    out = []
    for s in range(first, first + count):
        epoch = s // N_SAMPLES
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(N_SAMPLES)
        out.append(int(perms[epoch][s % N_SAMPLES]))
    return out


def test_batches_are_shifted_windows_of_int64():
    loader = PackedLoader(TOKENS, SEQ_LEN, global_batch_size=4)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu"
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(inputs[:, 0] % SEQ_LEN, torch.zeros(4, dtype=torch.int64))  # stride seq_len
    assert loader.samples_consumed == 4


def test_order_follows_the_seeded_per_epoch_permutation():
    loader = PackedLoader(TOKENS, SEQ_LEN, global_batch_size=6, seed=3)
    seen = [i for _ in range(10) for i in window_index(loader.next_batch()[0])]  # 60 slots: 2.4 epochs
    assert seen == reference_slots(3, 0, 60)
    assert sorted(seen[:N_SAMPLES]) == list(range(N_SAMPLES))  # an epoch visits every window once
    assert seen[:N_SAMPLES] != seen[N_SAMPLES:2 * N_SAMPLES]  # and the next epoch reshuffles
    assert loader.epoch == 2


def test_different_seeds_give_different_orders():
    a = PackedLoader(TOKENS, SEQ_LEN, 8, seed=0).next_batch()[0]
    b = PackedLoader(TOKENS, SEQ_LEN, 8, seed=1).next_batch()[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_ranks_concatenate_to_the_single_process_batch(dp_size):
    single = PackedLoader(TOKENS, SEQ_LEN, 8, seed=5)
    ranks = [PackedLoader(TOKENS, SEQ_LEN, 8, dp_rank=r, dp_size=dp_size, seed=5) for r in range(dp_size)]
    for _ in range(7):  # crosses two epoch boundaries
        expected_inputs, expected_targets = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), expected_inputs)
        assert torch.equal(torch.cat([p[1] for p in parts]), expected_targets)
        assert all(p[0].shape == (8 // dp_size, SEQ_LEN) for p in parts)


def test_resume_continues_exactly_where_it_stopped():
    uninterrupted = PackedLoader(TOKENS, SEQ_LEN, 4, seed=9)
    for _ in range(5):
        uninterrupted.next_batch()
    state = uninterrupted.state_dict()
    assert state == {"samples_consumed": 20, "seed": 9, "seq_len": SEQ_LEN}
    resumed = PackedLoader(TOKENS, SEQ_LEN, 4, seed=0)  # the saved seed wins
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(resumed.next_batch()[0], uninterrupted.next_batch()[0])


def test_resume_on_a_different_data_parallel_size():
    saved_by_four = [PackedLoader(TOKENS, SEQ_LEN, 8, dp_rank=r, dp_size=4, seed=2) for r in range(4)]
    for _ in range(3):
        for loader in saved_by_four:
            loader.next_batch()
    state = saved_by_four[0].state_dict()
    reference = PackedLoader(TOKENS, SEQ_LEN, 8, seed=2)
    reference.load_state_dict({"samples_consumed": 24, "seed": 2, "seq_len": SEQ_LEN})
    resumed_by_two = [PackedLoader(TOKENS, SEQ_LEN, 8, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in resumed_by_two:
        loader.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in resumed_by_two]),
                           reference.next_batch()[0])


def test_batch_larger_than_the_data_wraps_epochs():
    loader = PackedLoader(TOKENS, SEQ_LEN, global_batch_size=60, seed=4)
    assert window_index(loader.next_batch()[0]) == reference_slots(4, 0, 60)


def test_indivisible_global_batch_names_both_numbers():
    with pytest.raises(DataError, match="global_batch_size 6 is not divisible by the data-parallel size 4"):
        PackedLoader(TOKENS, SEQ_LEN, global_batch_size=6, dp_rank=0, dp_size=4)


def test_too_little_data_is_a_data_error():
    with pytest.raises(DataError, match="data has 8 tokens, fewer than seq_len\\+1 = 9"):
        PackedLoader(TOKENS[:8], SEQ_LEN, 2)
    assert PackedLoader(TOKENS[:9], SEQ_LEN, 2).n_samples == 1


def test_resuming_with_another_seq_len_is_a_data_error():
    loader = PackedLoader(TOKENS, SEQ_LEN, 4)
    with pytest.raises(DataError, match="used seq_len 16, but this run uses 8"):
        loader.load_state_dict({"samples_consumed": 4, "seed": 0, "seq_len": 16})


def test_eval_batches_are_sequential_and_bounded():
    batches = list(iter_eval_batches(TOKENS, SEQ_LEN, batch_size=10, max_batches=100))
    assert [b[0].shape[0] for b in batches] == [10, 10, 5]  # 25 windows, smaller last batch
    starts = [i for inputs, _ in batches for i in window_index(inputs)]
    assert starts == list(range(N_SAMPLES))
    assert all(torch.equal(t, i + 1) for i, t in batches)
    assert len(list(iter_eval_batches(TOKENS, SEQ_LEN, batch_size=10, max_batches=2))) == 2


def test_eval_batches_spread_over_the_whole_stream_when_budget_is_short():
    batches = list(iter_eval_batches(TOKENS, SEQ_LEN, batch_size=2, max_batches=2))  # 4 of 25 windows
    starts = [i for inputs, _ in batches for i in window_index(inputs)]
    assert starts == [0, 6, 12, 18]  # evenly spaced, reaching the last quarter of the data
    assert len(set(starts)) == 4


def test_eval_batches_on_short_data():
    assert [b[0].shape for b in iter_eval_batches(TOKENS[:9], SEQ_LEN, 4, 3)] == [(1, SEQ_LEN)]
    assert list(iter_eval_batches(TOKENS[:8], SEQ_LEN, 4, 3)) == []
    assert list(iter_eval_batches(np.empty(0, dtype=np.uint16), SEQ_LEN, 4, 3)) == []
