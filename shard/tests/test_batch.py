"""A step's integer tensors on their way to the device (shard/batch.py): one buffer of bytes,
one copy, and views of it with each tensor's own dtype and shape."""

from __future__ import annotations

import torch

from shard.batch import pack, unpack


def test_step_tensors_travel_as_their_own_bytes_and_arrive_as_views_of_one_buffer():
    """Each tensor starts 16 bytes aligned (Triton specializes on pointer alignment) and comes
    back as a view of the one buffer, with its dtype: on the device no kernel converts it."""
    sent = [torch.arange(3), torch.arange(7, dtype=torch.int32),
            torch.arange(10, 16, dtype=torch.int32).view(2, 3), torch.arange(1),
            torch.zeros(0, dtype=torch.int32), torch.tensor([-5, 2**40])]
    packed, starts = pack(sent)
    assert packed.dtype == torch.uint8
    assert starts == [0, 32, 64, 96, 112, 112]
    arrived = unpack(packed, starts, sent)
    for tensor, view in zip(sent, arrived):
        assert view.dtype == tensor.dtype and torch.equal(view, tensor)
        assert view.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        assert view.data_ptr() % 16 == 0
