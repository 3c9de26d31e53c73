"""The training run: the Accelerate loop (loop.py), checkpoints, metrics logging, stages of continual
fine-tuning and their metrics, process launch and opt-in kernels. Calls evaluation during training, so it sits
above it; imports every layer below."""
