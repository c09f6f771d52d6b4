"""Reward servers we run ourselves: OCR (``ocr``) and the model scorers (``serve``: pickscore, hpsv2, image_reward,
aesthetic), on one shared core (``core``). vLLM serves the model-based judges directly."""
