"""KV transfer between engines: disaggregated prefill/decode (docs/disaggregation.md).

layout.py / wire.py   the self-describing KV layout (from configs only) and wire format
base.py               the connector protocol (scheduler and worker halves) and the null connector
p2p_connector.py      consumer pulls a finished prefill's blocks from its producer
tcp_transport.py      pyzmq transport (default); nccl_transport.py: GPU to GPU (gloo on CPU)
proxy.py              `kvflow proxy`: one OpenAI endpoint over prefill and decode instances
"""
from kvflow.kv_transfer.layout import (AXES, ENGINE_AXIS_ORDER, KVLayout, KVLayoutError,
                                       model_fingerprint, rank_head_range, sender_ranks_for)
from kvflow.kv_transfer.wire import (KVTransfer, KVWireError, decode_transfer, encode_transfer,
                                     gather_blocks, handshake, receive, scatter_blocks, send)

__all__ = ["AXES", "ENGINE_AXIS_ORDER", "KVLayout", "KVLayoutError", "KVTransfer", "KVWireError",
           "decode_transfer", "encode_transfer", "gather_blocks", "handshake", "model_fingerprint",
           "rank_head_range", "receive", "scatter_blocks", "send", "sender_ranks_for"]
