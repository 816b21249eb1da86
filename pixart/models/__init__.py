"""Model components, one file each."""
