"""The in-process serving stack: continuous batching over a transformers causal LM.

Rows join and leave between decode steps; prompts are prefilled packed, in chunks between
steps, past a shared persona prefix or a returning viewer's kept start; the decode step and
small prefills replay as CUDA graphs on a GPU; weights may be quantized to int4. It works on
tensors and token ids only: it knows nothing of chat, personas or platforms, and imports only
``engine.types`` and ``engine.errors`` from the rest of the engine.

The transformers backend is its one caller and uses only the names below (a test keeps it so):
``supports`` decides whether a model can be batched, ``ContinuousBatch`` is the batch the
backend's worker thread steps, ``PrefixCache`` keeps returning viewers' prompt starts, and
``quantize_int4`` is a load-time step. Everything under this package needs torch.
"""

from engine.serving.continuous import ContinuousBatch, supports
from engine.serving.int4 import quantize_int4
from engine.serving.prefill import Chunked, Joining
from engine.serving.prefix_cache import PrefixCache, common_prefix

__all__ = ["Chunked", "ContinuousBatch", "Joining", "PrefixCache", "common_prefix",
           "quantize_int4", "supports"]
