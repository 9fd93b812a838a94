from kvflow.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadata,
                                      AttentionSpec, BackendCapabilities)

__all__ = ["AttentionBackend", "AttentionImpl", "AttentionMetadata", "AttentionSpec",
           "BackendCapabilities"]
