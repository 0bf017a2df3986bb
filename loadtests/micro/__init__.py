"""Microbenchmarks of one component without the serving stack (one vLLM engine, the router policy). They
import product internals on purpose; nothing here talks HTTP."""
