"""Which batch sizes and token counts the CUDA graphs are captured for (--cuda-graphs,
--cuda-graph-tokens): parsed on any machine, captured only on a GPU."""

from __future__ import annotations

import pytest

from shard.cuda_graphs import parse_batch_sizes, parse_token_sizes


def test_auto_token_buckets_reach_the_largest_step_and_stop_there():
    assert parse_token_sizes("auto", 64) == [16, 32, 64]
    assert parse_token_sizes("auto", 65) == [16, 32, 64, 128]
    # 1,024-token chunks beside 256 decodes: steps of 128 past 256.
    assert parse_token_sizes("auto", 1280) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896,
                                               1024, 1152, 1280]
    # Without a cost given, past 2,048 too, up to the largest step.
    assert parse_token_sizes("auto", 4096 + 256)[-3:] == [4096, 4224, 4352]
    assert parse_token_sizes("auto", 2100)[-4:] == [1792, 1920, 2048, 2176]


def test_auto_token_buckets_past_2048_only_while_a_layer_stays_small():
    # Llama-3.2-1B: 2 x 60.8M weights per layer; the default 4,096-token chunks + 256 decodes
    # are all captured.
    one_b = 2 * 60_817_408
    assert parse_token_sizes("auto", 4096 + 256, one_b)[-3:] == [4096, 4224, 4352]
    # Llama-3.1-8B: 2 x 218.1M per layer; graphs end at 2,048 and larger steps run eagerly.
    eight_b = 2 * 218_103_808
    assert parse_token_sizes("auto", 4096 + 256, eight_b)[-1] == 2048
    # Below 2,048 tokens the cost does not matter.
    assert parse_token_sizes("auto", 1280, eight_b)[-1] == 1280


def test_token_buckets_from_a_list_or_none():
    assert parse_token_sizes("512, 128,128", 4096) == [128, 512]
    assert parse_token_sizes("0", 4096) == [] and parse_token_sizes("", 4096) == []
    with pytest.raises(ValueError, match="must be positive"):
        parse_token_sizes("64,-1", 4096)


def test_auto_decode_batch_sizes_end_at_the_max_batch_size():
    assert parse_batch_sizes("auto", 12) == [1, 2, 4, 8, 12]
    assert parse_batch_sizes("1,2,4,8", 256) == [1, 2, 4, 8]
    assert parse_batch_sizes("0", 256) == []
