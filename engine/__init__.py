"""The model runtime both pools run.

A Llama-family model in torch, weight and tokenizer loading (HF directories and
GGUF), a paged KV block pool with prefix hashing, a continuous-batching scheduler
with chunked prefill, and sampling. It knows nothing of Ray, Redis or gRPC.

    from engine import LLM, SamplingParams
"""

from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import EngineLoad, RequestMetrics, RequestOutput
from engine.resume import Resume
from engine.sampling import SamplingParams, TokenLogprob

__all__ = [
    "LLM",
    "EngineConfig",
    "EngineLoad",
    "LLMEngine",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "Resume",
    "SamplingParams",
    "TokenLogprob",
]
