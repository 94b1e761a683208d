"""gRPC adapter: ``servicer`` (the ``dpo.v1.DpoService`` methods), ``server`` (listener,
health, reflection, channel options), ``convert`` (proto ↔ REST-shaped dicts, shared with the
client) and ``gen`` (stubs generated from ``proto/dpo/v1/dpo_service.proto``)."""
