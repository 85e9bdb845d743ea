"""CLIP models: loading (hub tag, local file, local-dir, offline presets) and text classifier heads."""
