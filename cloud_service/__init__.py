"""The cloud side of splitkd: teacher, split-KD sessions, model registry, gRPC + HTTP."""
