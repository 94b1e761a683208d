"""HTTP adapter: ``app`` (the FastAPI factory and error handlers), ``middleware`` (body limit,
request ids and access log) and ``routes`` (the endpoints, on an ``APIRouter``)."""
