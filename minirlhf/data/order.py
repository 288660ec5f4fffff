"""Data order: the batch of optimizer step ``s`` is a function of ``(seed, s)`` only.

Epoch ``e`` visits the examples in ``epoch_permutation(n, seed, e)``, drawn from a generator of its
own, so no other randomness (dropout, sampling) can shift it. ``--resume`` therefore only has to
restore the step counter to feed the continued run exactly the batches it would have seen.
"""
import math

import torch

from minirlhf.errors import MinirlhfError


def epoch_permutation(num_examples, seed, epoch):
    """The order in which epoch ``epoch`` visits ``num_examples`` examples: a permutation that
    depends only on ``(seed, epoch)`` (its own generator, untouched by any other randomness).
    Negative "epochs" serve one-off draws: -1 the held-out test split, -2 KTO's mismatched pairs."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**62)
    return torch.randperm(num_examples, generator=generator).tolist()


class BatchSchedule:
    """Which examples each optimizer step uses.

    Epoch ``e`` is ``epoch_permutation(n, seed, e)`` cut into ``steps_per_epoch = n // batch_size``
    batches (the remainder is dropped so every step sees ``batch_size`` examples; it is a different
    remainder each epoch). ``total_steps = ceil(epochs * steps_per_epoch)``.
    """

    def __init__(self, num_examples, batch_size, epochs, seed):
        if num_examples < batch_size:
            raise MinirlhfError(
                f"the training set has {num_examples} examples, fewer than --batch-size {batch_size}"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self.total_steps = max(1, math.ceil(epochs * self.steps_per_epoch))

    def batch(self, step):
        """Example indices of optimizer step ``step`` (0-based), a list of ``batch_size`` ints."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(self.num_examples, self.seed, epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]


def hold_out(examples, fraction, seed):
    """Split ``examples`` into ``(train, test)``: ``round(fraction · n)`` of them, chosen by ``seed``
    (``epoch_permutation`` of epoch -1), form the test split."""
    order = epoch_permutation(len(examples), seed, epoch=-1)
    n_test = int(round(fraction * len(examples)))
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]
