"""The bottom layer: errors, the name registry, atomic file IO, locks and hashing. Imports nothing of ours."""
