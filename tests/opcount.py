"""Counting the ATen ops a block of code dispatches: each one a kernel launch on a GPU, so the cost of a decode
step there (and a fair share of it on a CPU)."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as ops: ...`; then `ops.n` is the number of ATen ops dispatched inside (with `only`, of the
    ops whose name contains it: `OpCounter("_local_scalar_dense")` counts host syncs)."""

    def __init__(self, only: str | None = None) -> None:
        super().__init__()
        self.only = only
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += self.only is None or self.only in str(func)
        return func(*args, **(kwargs or {}))
