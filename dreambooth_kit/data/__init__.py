"""What goes into training: the subject photos checked before any model loads (format, size, EXIF,
duplicates, captions, masks, the prompts against the tokenizer), aspect-ratio buckets, class images
for prior preservation (generated seeded and atomic, tracked by a manifest, shared through the store)
and the dataset and samplers that turn all of it into batches."""
