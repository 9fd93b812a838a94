"""fp32 logits on CUDA vs HF (CPU and CUDA), per attention backend; prints max abs diffs."""
import numpy as np
import torch

from kvflow import LLM
from tests.conftest import make_hf_model, save_hf_model
from tests.test_models_hf import _kvflow_logits

print("allow_tf32", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
      flush=True)
hf = make_hf_model("llama")
path = save_hf_model(hf, "/tmp/diag-llama")
ids = np.random.default_rng(0).integers(0, 383, size=150).tolist()
with torch.no_grad():
    ref_cpu = hf(torch.tensor([ids])).logits[0].float()
    ref_gpu = hf.cuda()(torch.tensor([ids]).cuda()).logits[0].float().cpu()
    hf.cpu()
print("hf gpu vs cpu", (ref_gpu - ref_cpu).abs().max().item(), flush=True)
for backend in ("torch", "triton"):
    for eager_ops in (True,):
        llm = LLM(path, skip_tokenizer_init=True, device="cuda", kv_cache_memory=8 << 20,
                  attention_backend=backend, enforce_eager=True)
        for split in (67, 149):
            ours = _kvflow_logits(llm, ids, split)
            print(backend, "split", split, "vs cpu", (ours - ref_cpu).abs().max().item(),
                  "vs gpu", (ours - ref_gpu).abs().max().item(), flush=True)
