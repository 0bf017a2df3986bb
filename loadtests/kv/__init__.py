"""KV handoff studies: in-process benchmarks of vLLM engines and kvtransfer. They import product internals
on purpose; nothing here talks HTTP."""
