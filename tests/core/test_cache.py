import pytest
import torch

from dyndepth import KVCache


def test_update_writes_at_positions_and_skips_masked_tokens():
    cache = KVCache(num_slots=2, batch_size=2, max_seq_len=6, num_kv_heads=1, head_dim=2)
    k = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 1, 2)  # (B, T, G, H)
    positions = torch.tensor([[0, 1, 2], [0, 0, 1]])
    write = torch.tensor([[True, True, True], [False, True, True]])  # row 1: a PAD at position 0
    k_all, v_all, valid = cache.update(1, k, -k, positions, write)
    assert valid.tolist() == [[True, True, True, False, False, False], [True, True, False, False, False, False]]
    torch.testing.assert_close(k_all[1, 0, :2], k[1, 1:, 0])  # the PAD did not overwrite position 0
    torch.testing.assert_close(v_all[0, 0, :3], -k[0, :, 0])
    assert not cache.valid[0].any()  # other slots untouched


def test_window_shares_storage_and_limits_what_readers_see():
    cache = KVCache(1, 1, 8, 1, 2)
    view = cache.window(3)
    k_all, _, valid = view.update(0, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([[2]]))
    assert k_all.shape[2] == 3 and valid.tolist() == [[False, False, True]]
    assert cache.valid[0, 0, 2] and cache.k[0, 0, 0, 2].eq(1).all()


def test_bytes_per_token():
    cache = KVCache(3, 1, 4, 2, 8, dtype=torch.bfloat16)
    assert cache.nbytes_per_token() == 2 * 3 * 2 * 8 * 2


def test_a_row_view_writes_into_its_rows_and_reads_them_gathered():
    cache = KVCache(num_slots=1, batch_size=3, max_seq_len=4, num_kv_heads=1, head_dim=2)
    view = cache.rows(torch.tensor([2, 0])).window(3)
    assert view.batch_size == 2 and cache.rows(torch.tensor([2, 0])).rows(torch.tensor([1])).row_index.tolist() == [0]
    k = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 2.0]]]])  # (M=2, T=1, G, H)
    k_all, _, valid = view.update(0, k, k, torch.tensor([[1], [0]]))
    assert k_all.shape == (2, 1, 3, 2) and valid.tolist() == [[False, True, False], [True, False, False]]
    assert cache.k[0, 2, 0, 1].tolist() == [1.0, 1.0] and cache.k[0, 0, 0, 0].tolist() == [2.0, 2.0]
    assert not cache.valid[0, 1].any()  # the row outside the view is untouched
    assert view.count(0).tolist() == [1, 1] and cache.count(0).tolist() == [1, 0, 1]


def test_invalidate_and_rewrite_from_act_on_a_row_views_rows_only():
    """`invalidate` of a row view dropped entries of every row (a (M, 1) start against B rows: a shape error, or the
    wrong rows when M was 1)."""
    cache = KVCache(num_slots=2, batch_size=3, max_seq_len=4, num_kv_heads=1, head_dim=2)
    k = torch.ones(3, 4, 1, 2)
    for slot in (0, 1):
        cache.update(slot, k, k, torch.arange(4).expand(3, 4))
    cache.rows(torch.tensor([1])).invalidate(torch.tensor([2]), slots=[1])
    assert cache.count(1).tolist() == [4, 2, 4] and cache.count(0).tolist() == [4, 4, 4]
    cache.rows(torch.tensor([2, 0])).rewrite_from(torch.tensor([[3, 3], [1, 2]]), torch.tensor([[1, 1], [0, 1]]) > 0,
                                                  slots=[0])  # row 0's first valid position is 2
    assert cache.count(0).tolist() == [2, 4, 3] and cache.count(1).tolist() == [4, 2, 4]
    cache.rewrite_from(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.bool), slots=[0, 1])
    assert cache.count(0).tolist() == [2, 4, 3]  # rows of PAD only drop nothing


def test_invalidate_drops_from_the_position_on_and_count_ignores_the_scratch_column():
    cache = KVCache(1, 1, 6, 1, 2)
    kv = torch.ones(1, 6, 1, 2)
    write = torch.tensor([[True, True, True, True, False, True]])  # position 4: a token that does not write
    cache.update(0, kv, kv, torch.arange(6)[None], write)
    assert int(cache.count(0)) == 5  # the unwritten token went to the scratch column, which counts nothing
    cache.invalidate(3)
    assert cache.valid[0, 0, :6].tolist() == [True, True, True, False, False, False]  # 3 itself goes, 2 stays
    with pytest.raises(ValueError, match="window length 0 is outside 1..6"):
        cache.window(0)


def test_a_plain_write_after_a_sourced_one_and_a_reset_restore_the_column_sources():
    cache = KVCache(1, 1, 6, 1, 2)
    one = torch.ones(1, 1, 1, 2)
    cache.update(0, one, one, torch.tensor([[2]]), source_BT=torch.tensor([[5]]))  # compact column 2, position 5
    cache.update(0, one, one, torch.tensor([[2]]))  # column 2 rewritten by the token at position 2
    cache.invalidate(3)
    assert bool(cache.valid[0, 0, 2])  # (its source said 5: dropped)
    cache.update(0, one, one, torch.tensor([[1]]), source_BT=torch.tensor([[4]]))
    cache.reset()
    cache.update(0, torch.ones(1, 3, 1, 2), torch.ones(1, 3, 1, 2), torch.arange(3)[None])
    cache.invalidate(2)
    assert cache.valid[0, 0, :3].tolist() == [True, True, False]  # (a stale source 4 dropped column 1)
