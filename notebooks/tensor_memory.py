"""Count the bytes of the tensors a block of code creates: the notebooks' memory meter (chapters 1 and 13).

``tracemalloc`` cannot see tensors (torch allocates their memory in C++), and a CPU has no
``torch.cuda.max_memory_allocated``. So ``TensorMemory``, a ``TorchDispatchMode``, sees every aten
operation inside its ``with`` block, adds the bytes of each *new* storage an operation returns
(views and in-place results share an input's storage and are skipped) and subtracts them when the
storage is freed (a ``weakref.finalize`` on it). ``live`` is what is held now, ``peak`` the maximum
so far, ``largest`` the largest single storage, all in bytes and counting only what was created
inside the block; ``ops`` counts the aten operations (on a GPU, about one kernel launch each). It
sees the operations inside custom autograd functions and in the backward pass.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Live, peak and largest bytes of the tensor storages created inside the ``with`` block; aten ops run."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = self.ops = 0
        self._tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self._tracked:  # a view or an in-place result: no new memory
                continue
            self._tracked.add(ptr)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, storage.nbytes())
            weakref.finalize(storage, self._freed, ptr, storage.nbytes())
        return out

    def _freed(self, ptr, nbytes):
        self.live -= nbytes
        self._tracked.discard(ptr)
