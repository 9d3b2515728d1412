"""Random inputs and block masks for the block-sparse attention tests, and the dense element mask
that is their independent ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.kernels.block_mask import BlockSparseMask


@dataclass
class Case:
    name: str
    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    q_len: int = 40
    kv_len: int = 40
    head_dim: int = 16
    block: tuple[int, int] = (16, 16)
    density: float = 0.5
    causal: bool = False
    permuted: bool = False
    empty_rows: bool = False
    broadcast: bool = False  # mask with B = H = 1
    single_block: bool = False
    strided: bool = False  # q, k, v as [B, N, H, D] buffers seen through transpose(1, 2)


def random_blocks(case: Case, generator: torch.Generator) -> Tensor:
    bq, bk = case.block
    qb, kb = -(-case.q_len // bq), -(-case.kv_len // bk)
    b, h = (1, 1) if case.broadcast else (case.batch, case.heads)
    if case.single_block:
        blocks = torch.zeros(b, h, qb, kb, dtype=torch.bool)
        blocks[..., -1, kb - 1] = True
        blocks[..., 0, 0] = True
        return blocks
    blocks = torch.rand(b, h, qb, kb, generator=generator) < case.density
    if case.empty_rows:
        blocks[..., 0, :] = False  # a query block with no kept key block
        if qb > 2:
            blocks[..., qb // 2, :] = False
    return blocks


def make_case(case: Case, dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0):
    """q, k, v (requiring grad), the mask and the dense keep matrix [B, H, N, M] on original keys."""
    generator = torch.Generator().manual_seed(seed)
    blocks = random_blocks(case, generator)
    key_perm = None
    if case.permuted:
        pb = case.batch
        key_perm = torch.stack(
            [torch.randperm(case.kv_len, generator=generator) for _ in range(pb * case.kv_heads)]
        ).view(pb, case.kv_heads, case.kv_len)
    mask = BlockSparseMask.from_dense(blocks, case.block, case.q_len, case.kv_len, key_perm=key_perm)
    shape_q = (case.batch, case.heads, case.q_len, case.head_dim)
    shape_k = (case.batch, case.kv_heads, case.kv_len, case.head_dim)
    q = torch.randn(shape_q, generator=generator, dtype=torch.float64)
    k = torch.randn(shape_k, generator=generator, dtype=torch.float64)
    v = torch.randn(shape_k, generator=generator, dtype=torch.float64)
    keep = dense_keep(mask, case.batch, case.heads, case.kv_heads)
    tensors = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    if case.strided:
        tensors = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors]
    tensors = [t.requires_grad_(True) for t in tensors]
    return (*tensors, mask.to(device), keep.to(device))


def dense_keep(mask: BlockSparseMask, batch: int, heads: int, kv_heads: int) -> Tensor:
    """Element keep matrix on original key positions: key j sits in slot perm^-1[j]."""
    blocks = mask.to_dense().cpu().expand(batch, heads, mask.num_q_blocks, mask.num_k_blocks)
    query_block = torch.arange(mask.q_len) // mask.block_q
    if mask.key_perm is None:
        slot = torch.arange(mask.kv_len).expand(batch, heads, mask.kv_len)
    else:
        slot_of_key = torch.argsort(mask.key_perm.cpu().long().expand(batch, kv_heads, mask.kv_len), dim=-1)
        slot = slot_of_key.repeat_interleave(heads // kv_heads, dim=1)
    key_block = slot // mask.block_k  # [B, H, M]
    rows = blocks[:, :, query_block]  # [B, H, N, Kb]
    return torch.gather(rows, 3, key_block[:, :, None, :].expand(batch, heads, mask.q_len, mask.kv_len))


def rel_error(x: Tensor, ref: Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


# the option matrix of issue 3; tiny sizes so the Triton interpreter runs them in seconds
OPTION_MATRIX = [
    Case("plain"),
    Case("causal", causal=True),
    Case("ragged_n_ne_m_causal", q_len=23, kv_len=45, causal=True),
    Case("ragged_n_ne_m", q_len=37, kv_len=21),
    Case("empty_rows", q_len=48, empty_rows=True, causal=True),
    Case("single_block", q_len=33, kv_len=50, single_block=True),
    Case("full_density_causal", density=1.1, causal=True),
    Case("gqa", heads=4, kv_heads=2, causal=True, q_len=30, kv_len=50),
    Case("mqa_batch", batch=2, heads=3, kv_heads=1, density=0.6),
    Case("batch_heads_patterns", batch=2, heads=2, kv_heads=2, causal=True, q_len=40, kv_len=56),
    Case("broadcast_mask", batch=2, heads=2, broadcast=True, causal=True),
    Case(
        "permuted_keys",
        batch=2,
        heads=2,
        kv_heads=1,
        permuted=True,
        causal=True,
        q_len=35,
        kv_len=48,
        density=0.7,
    ),
    Case("permuted_noncausal", permuted=True, q_len=32, kv_len=41),
    Case("blocks_32x16", block=(32, 16), q_len=50, kv_len=70, causal=True, density=0.6),
    Case("strided_layout", batch=2, heads=4, kv_heads=2, strided=True, causal=True, q_len=40, kv_len=56),
    Case("blocks_16x32_d32", block=(16, 32), head_dim=32, q_len=45, kv_len=77, causal=True, density=0.6),
]
