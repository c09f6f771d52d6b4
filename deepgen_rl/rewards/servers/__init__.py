"""Reward servers we run ourselves (the OCR server). vLLM serves the model-based judges directly."""
