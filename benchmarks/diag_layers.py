"""Bisect an fp32 mismatch on CUDA: residual stream after each layer, ours vs HF (same device)."""
import os
import numpy as np
import torch

from kvflow import LLM
from kvflow.attention.backend import AttentionMetadata
from kvflow.forward_context import set_forward_context
from tests.conftest import make_hf_model, save_hf_model

hf = make_hf_model("llama").cuda()
path = save_hf_model(hf.cpu(), "/tmp/diag2-llama")
hf.cuda()
ids = np.random.default_rng(0).integers(0, 383, size=150).tolist()
x = torch.tensor([ids]).cuda()
with torch.no_grad():
    out = hf(x, output_hidden_states=True)
hs = [h[0].float() for h in out.hidden_states]  # embeddings, after layer 0, ..., final normed
llm = LLM(path, skip_tokenizer_init=True, device="cuda", kv_cache_memory=8 << 20, enforce_eager=True,
          attention_backend="torch")
model = llm.llm_engine.executor.worker.runner.model
captured = []
for layer in model.model.layers:
    layer.register_forward_hook(lambda m, a, o: captured.append((o[0] + o[1]).float()))
n = len(ids)
md = AttentionMetadata(num_actual_tokens=n, max_query_len=n, max_seq_len=n,
                       query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                       seq_lens=torch.tensor([n], dtype=torch.int32, device="cuda"),
                       block_table=torch.arange(-(-n // 16), dtype=torch.int32, device="cuda")[None],
                       slot_mapping=torch.arange(n, device="cuda"))
with torch.inference_mode(), set_forward_context(md):
    emb = model.model.embed_tokens(x[0])
    final = model.model(x[0], torch.arange(n, device="cuda"))
print("embed", (emb.float() - hs[0]).abs().max().item())
for i, c in enumerate(captured):
    print("layer", i, (c - hs[i + 1]).abs().max().item() if i + 1 < len(hs) - 1 else "(last: normed in HF)")
print("final normed", (final.float() - hs[-1]).abs().max().item())
rot = model.model.layers[0].self_attn.rotary_emb
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
hrot = hf.model.rotary_emb
pos = torch.arange(n, device="cuda")[None]
cos, sin = hrot(hs[0][None], pos)
ours_cos, ours_sin = rot.cos_sin_cache[:n].chunk(2, -1)
print("cos diff", (ours_cos - cos[0, :, :ours_cos.shape[1]].float()).abs().max().item(),
      "sin diff", (ours_sin - sin[0, :, :ours_sin.shape[1]].float()).abs().max().item())
