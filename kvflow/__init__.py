"""kvflow: a fast LLM inference and serving engine with vLLM's API."""
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # Import the engine lazily: `import kvflow` stays cheap for the CLI and tools.
    if name == "LLM":
        from kvflow.llm import LLM
        return LLM
    if name == "LLMEngine":
        from kvflow.engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "__version__"]
