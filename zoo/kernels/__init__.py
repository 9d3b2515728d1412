"""Triton kernels, each beside its pure-PyTorch reference. No nn.Modules here.

CUDA tensors run the Triton kernels; CPU tensors run the references (the tests also run the
kernels on the CPU through ``TRITON_INTERPRET=1`` at tiny sizes).
"""

from zoo.lazy import lazy_exports

_EXPORTS = {
    # block-sparse flash attention and the one mask type of the library
    "BlockSparseMask": "block_mask",
    "block_sparse_attention": "block_sparse",
    "block_sparse_attention_reference": "block_sparse",
    "dense_attention_reference": "block_sparse",
    # XAttention's antidiagonal block scoring
    "antidiagonal_block_scores": "antidiagonal",
    "antidiagonal_block_scores_reference": "antidiagonal",
    "antidiagonal_block_scores_triton": "antidiagonal",
    # PBS-Attn's last-block key importance
    "key_importance": "pbs_importance",
    "key_importance_reference": "pbs_importance",
    "key_importance_triton": "pbs_importance",
    # cumulative-threshold block selection (XAttention, PBS-Attn)
    "threshold_select": "threshold_select",
    "threshold_select_reference": "threshold_select",
    "threshold_select_triton": "threshold_select",
    # Mix-FFN's depthwise 3x3 convolution + bias + GELU, fused
    "dwconv3x3_gelu": "dwconv_gelu",
    "dwconv3x3_gelu_reference": "dwconv_gelu",
    # PoNet's pooling mixing step (forward + backward)
    "ponet_pool_mixing": "ponet_pool",
    "ponet_pool_mixing_packed": "ponet_pool",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
