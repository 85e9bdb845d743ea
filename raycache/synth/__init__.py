"""Class-balanced synthetic image sets from a diffusers text-to-image model (CacheFL's cache keys)."""
