"""What a GRPO step costs: FLOPs by phase (counted with torch's FlopCounterMode on the real modules), bytes each
rank sends, the predicted seconds per step on N nodes, and the MFU the trainer logs (docs/compute.md)."""
