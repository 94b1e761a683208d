"""DPO loss service: REST + gRPC adapters over one engine that owns the model."""

__version__ = "0.1.0"
