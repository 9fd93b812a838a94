"""Scheduling and KV-block bookkeeping. CPU only: nothing here imports torch.cuda."""
