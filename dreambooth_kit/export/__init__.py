"""A finished run's results in the formats other tools load: kohya/A1111/ComfyUI LoRA files, a merged
diffusers folder, an original-layout single file, and a model card with exactly the files worth
sharing on the Hugging Face Hub."""
