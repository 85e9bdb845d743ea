"""Datasets: sources (digits, image folders, parquet), splits, partitions, and the encode-once feature store."""
