"""Attention and token-mixing mechanisms as nn.Modules, one published method per file."""

from zoo.lazy import lazy_exports

_EXPORTS = {
    # vision: FaViT's factorization self-attention
    "FactorizationSelfAttention": "fasa",
    # text: PoNet pooling token mixer
    "PoNetMixer": "ponet",
    # long-context sparse prefill
    "XAttention": "xattention",
    "PBSAttention": "pbs_attention",
    "MInference": "minference",
    # approximate attention
    "SEAAttention": "sea",
    "ScatterbrainAttention": "scatterbrain",
    "scatterbrain_attention": "scatterbrain",
    "CombinerAttention": "combiner",
    "combiner_attention": "combiner",
    "PQSparseAttention": "spt_attention",
    "pq_sparse_attention": "spt_attention",
    # routing and multi-modal layers
    "MoE": "moe",
    "RoutedFFN": "spt_ffn",
    "GINAttention": "gin_attention",
    "SparseGINAdapter": "gin_attention",
    "MoTBlock": "mixture_of_transformers",
    # weather: 3D (shifted) window attention used by Adas and the forecaster
    "WindowAttention3D": "window_attention",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
