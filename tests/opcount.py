"""Counting the ATen ops a block of code dispatches: each one a kernel launch on a GPU, so the cost of a decode
step there (and a fair share of it on a CPU)."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as ops: ...`; then `ops.n` is the number of ATen ops dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))
