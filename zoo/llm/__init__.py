"""Long-context LLM prefill: sparse-prefill patching of Hugging Face causal LMs, our small LM, eval.

- :func:`sparse_prefill` / :func:`unpatch`: XAttention, PBS-Attn or MInference on the prefill of a
  transformers causal LM (decoding stays dense), through transformers' attention registry.
- ``zoo_llama_9m``: a small Llama-style LM (family ``"llm"``), trained by ``zoo train lm`` on
  offline text with a tokenizer trained by ``zoo train lm-data``.
- ``zoo eval prefill``: density, coverage, output error, perplexity and needle retrieval of every
  method against dense attention (:mod:`zoo.llm.harness`).
- ``zoo train minference-config``: MInference's offline per-head pattern search
  (:mod:`zoo.llm.pattern_search`); ``zoo train xattention-thresholds``: XAttention's per-head
  threshold profiling (:mod:`zoo.llm.threshold_profile`).

Importing this package registers the models; transformers is imported only when a model is
built or a model is patched.
"""

from zoo.llm.model import LLM_ARCHS, build_llama, load_pretrained_tokenizer, register_shipped_weights
from zoo.llm.patch import SparsePrefillPatch, sparse_prefill, unpatch

__all__ = [
    "LLM_ARCHS",
    "SparsePrefillPatch",
    "build_llama",
    "load_pretrained_tokenizer",
    "register_shipped_weights",
    "sparse_prefill",
    "unpatch",
]

register_shipped_weights()
