"""KV transfer between engines (issue 9). This package is the foundation: a self-describing
layout (`layout.KVLayout`, built from configs only) and wire format with layout conversion
(`wire`). Transport and engine integration come later and build on these."""
from kvflow.kv_transfer.layout import (AXES, ENGINE_AXIS_ORDER, KVLayout, KVLayoutError,
                                       model_fingerprint, rank_head_range, sender_ranks_for)
from kvflow.kv_transfer.wire import (KVTransfer, KVWireError, decode_transfer, encode_transfer,
                                     gather_blocks, handshake, receive, scatter_blocks, send)

__all__ = ["AXES", "ENGINE_AXIS_ORDER", "KVLayout", "KVLayoutError", "KVTransfer", "KVWireError",
           "decode_transfer", "encode_transfer", "gather_blocks", "handshake", "model_fingerprint",
           "rank_head_range", "receive", "scatter_blocks", "send", "sender_ranks_for"]
