"""SENA in pure PyTorch: iterative self-evolution of a LLaVA-1.5 model from unlabeled images."""
