"""`neuraldb serve`: an OpenAI-compatible server with a knowledge API over one database
(engine.py owns the model, wal.py makes writes durable, app.py is the HTTP layer)."""
