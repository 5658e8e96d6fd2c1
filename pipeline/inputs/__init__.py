"""What an export starts from: the model sources, the data, the preprocessing (deployment) record and the safe
readers of array files."""
