"""Plumbing every layer shares and none owns: atomic writes (a file or folder is the old one or the
whole new one), file hashes remembered on disk, the toolkit's cache folder, log format, the per-folder
run lock and the known-broken dependency pairings. Nothing here knows about diffusion models."""
