"""Training: feature extraction (data.py, extract.py) and the training loop."""
