"""Load generation and benchmarks. Black box: talks HTTP to any OpenAI-compatible endpoint only."""
