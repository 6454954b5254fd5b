from tunelab.engine.block_allocator import BlockAllocator


def test_prompt_blocks_are_allocated_and_released():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    table, cached = alloc.allocate_prompt(list(range(10)))
    assert len(table) == 3 and cached == 0 and alloc.num_free == 5
    alloc.release(table)
    assert alloc.num_free == 8 and table == []


def test_shared_prefix_reuses_full_blocks_but_never_the_last_tokens_block():
    alloc = BlockAllocator(num_blocks=16, block_size=4)
    prompt = list(range(12))  # exactly three full blocks
    first, _ = alloc.allocate_prompt(prompt)
    alloc.register_full_blocks(first, prompt, len(prompt), [])
    second, cached = alloc.allocate_prompt(prompt)
    # The third block holds the last prompt token: it is recomputed in a block of its own.
    assert cached == 8 and second[:2] == first[:2] and second[2] != first[2]
    assert alloc.ref_counts[first[0]] == 2


def test_released_prefix_blocks_stay_cached_for_later_requests():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    prompt = list(range(9))
    table, _ = alloc.allocate_prompt(prompt)
    alloc.register_full_blocks(table, prompt, len(prompt), [])
    kept = table[:2]
    alloc.release(table)
    again, cached = alloc.allocate_prompt(prompt)
    assert cached == 8 and again[:2] == kept


def test_different_prefixes_do_not_share():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    a = [1, 2, 3, 4, 5]
    table, _ = alloc.allocate_prompt(a)
    alloc.register_full_blocks(table, a, len(a), [])
    _, cached = alloc.allocate_prompt([9, 2, 3, 4, 5])
    assert cached == 0


def test_allocation_fails_cleanly_when_the_pool_is_too_small():
    alloc = BlockAllocator(num_blocks=2, block_size=4)
    assert alloc.allocate_prompt(list(range(9))) is None
    assert alloc.num_free == 2


def test_append_slot_grows_the_table_only_at_block_boundaries():
    alloc = BlockAllocator(num_blocks=3, block_size=4)
    table, _ = alloc.allocate_prompt([1, 2, 3])
    assert alloc.append_slot(table, 3) and len(table) == 1
    assert alloc.append_slot(table, 4) and len(table) == 2
    assert alloc.append_slot(table, 8) and len(table) == 3
    assert not alloc.append_slot(table, 12)
