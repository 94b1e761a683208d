"""Protocol adapters: ``http/`` (FastAPI), ``grpc/`` (grpc.aio) and what both share
(``common``). Adapters translate wire formats and call the engine's admission; they hold no
model state. Importing this package imports nothing else (the client uses ``grpc.gen`` and
``grpc.convert`` without the servers)."""
