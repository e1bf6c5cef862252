"""DecodeStep.fill (backends/paged_attention.py), which rewrites a row's block table only when its blocks
change, against each step's inputs laid out in full, over fills in which sequences grow, join, leave and
change rows."""

import random

import torch

from backends.paged_attention import DecodeStep
from backends.paged_cache import CacheShape, KVPool

BLOCK, MAX_BLOCKS, SCRATCH = 16, 6, 40


def expected(rows, batch):
    table = []
    for token, position, blocks in rows:
        slot = blocks[position // BLOCK] * BLOCK + position % BLOCK
        table.append([token, position, position + 1, slot, *blocks, *[0] * (MAX_BLOCKS - len(blocks))])
    table += [[0, 0, 1, SCRATCH * BLOCK, SCRATCH] + [0] * (MAX_BLOCKS - 1)] * (batch - len(rows))
    return torch.tensor(table)


def test_fill_equals_every_row_written_out():
    pool = KVPool(CacheShape(1, 1, 8, SCRATCH + 1, BLOCK), torch.float32, torch.device("cpu"))
    step = DecodeStep(pool, 8, MAX_BLOCKS, SCRATCH, None, 1)
    rng = random.Random(0)
    free = list(range(SCRATCH))
    rng.shuffle(free)
    seqs = []  # [position, blocks]
    for _ in range(300):
        if seqs and rng.random() < 0.08:  # one leaves; the ones after it move up a row
            for block in seqs.pop(rng.randrange(len(seqs)))[1]:
                free.append(block)
        if len(seqs) < 8 and rng.random() < 0.15 and free:
            seqs.insert(rng.randrange(len(seqs) + 1), [rng.randrange(40), []])
        for seq in list(seqs):  # each decodes a token, taking a block when it needs one, or leaves
            seq[0] += 1
            while len(seq[1]) * BLOCK <= seq[0] and free and len(seq[1]) < MAX_BLOCKS:
                seq[1].append(free.pop())
            if len(seq[1]) * BLOCK <= seq[0]:
                seqs.remove(seq)
                free.extend(seq[1])
        rows = [(rng.randrange(1000), position, tuple(blocks)) for position, blocks in seqs]
        step.fill(rows)
        want = expected(rows, 8)
        assert torch.equal(step.tokens, want[:, 0])
        assert torch.equal(step.positions, want[:, 1])
        assert torch.equal(step.lens, want[:, 2].int())
        assert torch.equal(step.write_slots, want[:, 3])
        assert torch.equal(step.table, want[:, 4:].int())


def test_tokens_on_the_device_replace_the_rows_own():
    pool = KVPool(CacheShape(1, 1, 8, SCRATCH + 1, BLOCK), torch.float32, torch.device("cpu"))
    step = DecodeStep(pool, 4, MAX_BLOCKS, SCRATCH, None, 1)
    step.fill([(7, 3, (2,)), (8, 20, (5, 9))], torch.tensor([11, 12]))
    assert step.tokens.tolist() == [11, 12, 0, 0]
    assert step.write_slots.tolist() == [2 * BLOCK + 3, 9 * BLOCK + 4, SCRATCH * BLOCK, SCRATCH * BLOCK]
