"""What the grouped blocks (GroupAddRev, DEQ) share: channels split into groups, one function F_i
per group, and what it takes to evaluate F_i again exactly as before (the random generators, the
autocast state, BatchNorm running statistics)."""
import contextlib
import copy
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["GroupedBlock", "autocast_state", "rng_state", "set_rng_state", "statistics_frozen"]


class GroupedBlock(torch.nn.Module):
    """Channels split into ``num_groups`` groups along ``split_dim``, group i with its own module
    ``convs[i]``: a ModuleList as given, or ``conv`` and ``num_groups - 1`` freshly initialized
    copies of it. A tensor argument whose size along ``split_dim`` equals the channel count is
    split across the groups; anything else goes whole to each."""

    def __init__(self, conv: Union[torch.nn.Module, torch.nn.ModuleList], split_dim: int, num_groups: Optional[int]):
        super().__init__()
        self.split_dim = split_dim
        if isinstance(conv, torch.nn.ModuleList):
            self.convs = conv
            return
        if num_groups is None:
            raise ValueError(f"{type(self).__name__}: num_groups is required when conv is a single module")
        self.convs = torch.nn.ModuleList([conv])
        for _ in range(num_groups - 1):
            copy_ = copy.deepcopy(conv)
            if hasattr(copy_, "reset_parameters"):
                copy_.reset_parameters()
            self.convs.append(copy_)

    @property
    def num_groups(self) -> int:
        return len(self.convs)

    def reset_parameters(self):
        for conv in self.convs:
            conv.reset_parameters()

    def split(self, x: Tensor, args: Sequence[Any]) -> Tuple[Tuple[Tensor, ...], List[Tuple[Any, ...]]]:
        """(x's groups, each group's arguments); raises ValueError if the channels do not split
        into equal groups."""
        channels = x.size(self.split_dim)
        if channels % self.num_groups != 0:
            raise ValueError(f"{type(self).__name__}: {channels} channels do not split into {self.num_groups} "
                             "equal groups")
        per_arg = [self._chunk(a, channels) for a in args]
        return torch.chunk(x, self.num_groups, dim=self.split_dim), [tuple(s[i] for s in per_arg)
                                                                      for i in range(self.num_groups)]

    def _chunk(self, value: Any, channels: int) -> Sequence[Any]:
        if isinstance(value, Tensor) and value.dim() > 0:
            dim = self.split_dim if self.split_dim >= 0 else value.dim() + self.split_dim
            if 0 <= dim < value.dim() and value.size(dim) == channels:
                return torch.chunk(value, self.num_groups, dim=self.split_dim)
        return [value] * self.num_groups


def rng_state(device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
    """The CPU generator's state, and the CUDA one of ``device`` when it is a GPU."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: Tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    """Puts the generators back to ``state`` (from :func:`rng_state` on the same device)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype, bool]:
    """What ``torch.autocast`` is doing now for ``device_type``, to be replayed by
    ``torch.autocast(*state)``."""
    return (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled())


@contextlib.contextmanager
def statistics_frozen(modules: Iterable[torch.nn.Module]):
    """BatchNorm running statistics (of those among ``modules`` in training mode that track them)
    stay as they are: an evaluation of F that is not the step's own must not move them a second
    time. A norm in training mode normalizes by the batch's statistics either way; while it does
    not track, it neither reads nor updates its running ones."""
    norms = [m for m in modules
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
