"""Which batch sizes and token counts the CUDA graphs are captured for (--cuda-graphs,
--cuda-graph-tokens): parsed on any machine, captured only on a GPU."""

from __future__ import annotations

import pytest

from shard.cuda_graphs import parse_batch_sizes, parse_token_sizes


def test_auto_token_buckets_reach_the_largest_step_and_stop_there():
    assert parse_token_sizes("auto", 64) == [16, 32, 64]
    assert parse_token_sizes("auto", 65) == [16, 32, 64, 128]
    # 1,024-token chunks beside 256 decodes: steps of 128 to 1,024, then of 256.
    assert parse_token_sizes("auto", 1280) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896,
                                               1024, 1280]
    # The default 4,096-token chunks: buckets end at 2,048; larger steps run eagerly.
    assert parse_token_sizes("auto", 4096 + 256)[-1] == 2048


def test_token_buckets_from_a_list_or_none():
    assert parse_token_sizes("512, 128,128", 4096) == [128, 512]
    assert parse_token_sizes("0", 4096) == [] and parse_token_sizes("", 4096) == []
    with pytest.raises(ValueError, match="must be positive"):
        parse_token_sizes("64,-1", 4096)


def test_auto_decode_batch_sizes_end_at_the_max_batch_size():
    assert parse_batch_sizes("auto", 12) == [1, 2, 4, 8, 12]
    assert parse_batch_sizes("1,2,4,8", 256) == [1, 2, 4, 8]
    assert parse_batch_sizes("0", 256) == []
