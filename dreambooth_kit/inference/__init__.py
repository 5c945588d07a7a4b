"""Using a trained result: ``load_pipeline`` (a base model plus LoRAs, placed and set up for fp16 on
CUDA) returns a pipeline handle, ``generate`` makes seeded, reproducible images with it, and the
generation settings travel inside each PNG (A1111's text and an exact JSON copy)."""
