"""The Trainer's data order held to its definition: each epoch reads the data without
replacement in a fresh random order (floor(n / batch) full batches, the rest dropped), and the
order changes from one epoch to the next. Samples are numbered by their value, so the order
read back is the order of indices."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ebm_fast import LangevinSampler
from ebm_fast.training import ContrastiveDivergence, Trainer
from ebm_fast.training.data import batch_stream

EPOCHS = 6


def numbered(n):
    return torch.arange(n, dtype=torch.float32)[:, None]


def read_epochs(data, n, batch, epochs=EPOCHS, seed=0):
    """[[indices of epoch 0 in reading order], ...] from batch_stream over data."""
    stream = batch_stream(data, batch, seed)
    per_epoch = n // batch
    out = []
    for _ in range(epochs):
        order = []
        for _ in range(per_epoch):
            x, y = next(stream)
            assert x.shape[0] == batch
            if y is not None:  # labels travel with their samples
                assert torch.equal(y, 100 + x[:, 0].long())
            order += x[:, 0].long().tolist()
        out.append(order)
    return out


def check_epochs(orders, n, batch):
    per_epoch = (n // batch) * batch
    for order in orders:
        # Without replacement: distinct samples, all of them when batch divides n.
        assert len(order) == per_epoch and len(set(order)) == per_epoch
        assert set(order) <= set(range(n))
    # Reshuffled: no two epochs share an order, and no epoch reads in storage order.
    assert len({tuple(order) for order in orders}) == len(orders)
    assert all(order != sorted(order) for order in orders)
    # Every sample moves: over the epochs, no index keeps its position.
    for position in range(per_epoch):
        assert len({order[position] for order in orders}) > 1


@pytest.mark.parametrize("n, batch", [(12, 4), (10, 3)])
def test_each_epoch_is_a_fresh_permutation_of_a_tensor(n, batch):
    orders = read_epochs(numbered(n), n, batch)
    check_epochs(orders, n, batch)
    if n % batch == 0:
        assert all(sorted(order) == list(range(n)) for order in orders)


def test_pairs_and_datasets_are_reshuffled_with_their_labels():
    n, batch = 12, 3
    x, y = numbered(n), 100 + torch.arange(n)
    for data in ((x, y), TensorDataset(x, y)):
        orders = read_epochs(data, n, batch)
        check_epochs(orders, n, batch)
        assert all(sorted(order) == list(range(n)) for order in orders)


def test_the_dropped_remainder_changes_between_epochs():
    """With n = 10 and batch 3 one sample per epoch is left out; which one is random."""
    orders = read_epochs(numbered(10), 10, 3, epochs=12)
    left_out = {(set(range(10)) - set(order)).pop() for order in orders}
    assert len(left_out) > 1


class Recording(ContrastiveDivergence):
    """CD-0 that keeps every positive batch it is given."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = []

    def __call__(self, x_pos, y=None):
        self.seen.append(x_pos[:, 0].long().tolist())
        return super().__call__(x_pos, y)


def test_fit_reads_each_epoch_in_a_new_order():
    n, batch = 8, 4
    energy = nn.Linear(1, 1)
    loss = Recording(LangevinSampler(energy, step_size=0.01, seed=0), k=0, alpha=0.1)
    trainer = Trainer(
        energy,
        loss,
        torch.optim.SGD(energy.parameters(), lr=0.0),
        progress=False,
        log_every=1000,
        data_seed=7,
    )
    trainer.fit(numbered(n), EPOCHS * n // batch, batch_size=batch)
    per_epoch = n // batch
    orders = [
        [i for b in loss.seen[e : e + per_epoch] for i in b]
        for e in range(0, len(loss.seen), per_epoch)
    ]
    assert len(orders) == EPOCHS
    check_epochs(orders, n, batch)
    assert all(sorted(order) == list(range(n)) for order in orders)
